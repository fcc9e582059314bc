"""Small helper networks trained once and cached: the evaluation probes and the toy REPA encoder.

Each is a classifier trained for a fixed number of Adam steps on fixed batches of a built-in dataset, so the
result depends only on its cache key; the weights land atomically in ``$SELFFLOW_CACHE`` (default
``~/.cache/selfflow``) and later calls load them instead of training again.
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


def cache_file(prefix: str, key: str) -> Path:
    """``$SELFFLOW_CACHE/<prefix>_<hash of key>.pt``: ``key`` must name everything that changes the weights."""
    root = Path(os.environ.get("SELFFLOW_CACHE", Path.home() / ".cache" / "selfflow"))
    return root / f"{prefix}_{hashlib.sha1(key.encode()).hexdigest()[:12]}.pt"


def cached_classifier(build: Callable[[], Net], path: Path, logits: Callable[[Net, torch.Tensor], torch.Tensor],
                      batches: Batches, steps: int, batch: int, seed: int, lr: float = 2e-3) -> Net:
    """The network ``build()`` makes, loaded from ``path``, or trained there first: ``steps`` Adam steps of
    cross-entropy between ``logits(net, images)`` and the labels of ``batches(range(step·batch,
    (step+1)·batch))``. Initialisation and training draw from ``seed`` inside a forked RNG, so the weights
    do not depend on the caller's random state and the caller's random stream is left as it was (a trainer
    that builds an evaluator mid-run continues identically whether the network was cached or not). Returned
    in eval mode (its parameters still require grad: callers freeze it if they keep it)."""
    with torch.random.fork_rng(devices=[]):  # the network trains on the CPU: only the CPU stream is forked …
        torch.random.default_generator.manual_seed(seed)  # … and seeded (manual_seed would reseed CUDA's too)
        net = build()
        if path.is_file():
            net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return net.eval()
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        for step in range(steps):
            images, labels = batches(range(step * batch, (step + 1) * batch))
            loss = nn.functional.cross_entropy(logits(net, images), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with atomic_path(path) as tmp:
        torch.save(net.state_dict(), tmp)
    return net.eval()
