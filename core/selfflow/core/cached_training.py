"""Small helper networks trained once and cached: the evaluation probes and the toy REPA encoder.

Each is a classifier trained for a fixed number of Adam steps on fixed batches of a built-in dataset, so the
result depends only on its cache key; the weights land atomically in ``$SELFFLOW_CACHE`` (default
``~/.cache/selfflow``) and later calls load them instead of training again.

What else changes the weights is pinned or keyed, so that a metric read through a cached network does not
depend on which run happened to train it: the training runs on :data:`TRAINING_THREADS` CPU threads whatever the
caller's setting (the shapes probe's weights differed by up to 0.14 between 1 and 2 threads), and the torch
version is part of every cache key (its kernels round differently).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from .atomic import atomic_path

Net = TypeVar("Net", bound=nn.Module)
Batches = Callable[[range], tuple[torch.Tensor, torch.Tensor]]  # stream indices → (images, labels)


TRAINING_THREADS = 2  # a helper net trains on this many CPU threads, whatever the caller's setting


def cache_file(prefix: str, key: str) -> Path:
    """``$SELFFLOW_CACHE/<prefix>_<hash of key>.pt``: ``key`` must name everything of the caller's that changes the
    weights (the torch version and the training threads are added here)."""
    root = Path(os.environ.get("SELFFLOW_CACHE", Path.home() / ".cache" / "selfflow"))
    key = f"{key}|torch {torch.__version__}|{TRAINING_THREADS} threads"
    return root / f"{prefix}_{hashlib.sha1(key.encode()).hexdigest()[:12]}.pt"


def cached_classifier(build: Callable[[], Net], path: Path, logits: Callable[[Net, torch.Tensor], torch.Tensor],
                      batches: Batches, steps: int, batch: int, seed: int, lr: float = 2e-3) -> Net:
    """The network ``build()`` makes, loaded from ``path``, or trained there first: ``steps`` Adam steps of
    cross-entropy between ``logits(net, images)`` and the labels of ``batches(range(step·batch,
    (step+1)·batch))``. Initialisation and training draw from ``seed`` inside a forked RNG, so the weights
    do not depend on the caller's random state and the caller's random stream is left as it was (a trainer
    that builds an evaluator mid-run continues identically whether the network was cached or not). Returned
    in eval mode (its parameters still require grad: callers freeze it if they keep it). It trains on
    :data:`TRAINING_THREADS` threads; the caller's thread count is restored after."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(TRAINING_THREADS)
        net = _load_or_train(build, path, logits, batches, steps, batch, seed, lr)
    finally:
        torch.set_num_threads(threads)
    return net.eval()


def _load_or_train(build: Callable[[], Net], path: Path, logits: Callable[[Net, torch.Tensor], torch.Tensor],
                   batches: Batches, steps: int, batch: int, seed: int, lr: float) -> Net:
    with torch.random.fork_rng(devices=[]):  # the network trains on the CPU: only the CPU stream is forked …
        torch.random.default_generator.manual_seed(seed)  # … and seeded (manual_seed would reseed CUDA's too)
        net = build()
        if path.is_file():
            net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return net
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        for step in range(steps):
            images, labels = batches(range(step * batch, (step + 1) * batch))
            loss = nn.functional.cross_entropy(logits(net, images), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with atomic_path(path) as tmp:
        torch.save(net.state_dict(), tmp)
    return net
