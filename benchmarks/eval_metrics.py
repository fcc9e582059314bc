"""Speed benchmarks of the image metrics (the eval package), rows of ``make bench``.

Each row: ``{name, ours, baseline, ratio, target, unit}`` where ``ratio`` is always "how many
times better ours is" (baseline_time / our_time for seconds, ours / baseline for throughputs) and
``target`` is the minimum acceptable ratio. All timings are medians over ``repeats`` runs.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from selfflow.eval.frechet import frechet_distance


def _median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _fd_scipy_sqrtm(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    import scipy.linalg

    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _random_stats(rng: np.random.Generator, dim: int, n: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    x = rng.standard_normal((n, dim)) @ (rng.standard_normal((dim, dim)) / np.sqrt(dim)) + shift
    return x.mean(0), np.cov(x, rowvar=False)


def bench_fd(dim: int = 2048, repeats: int = 3, baseline_repeats: int = 1, *,
             inception: bool = True, inception_batch: int = 8, inception_repeats: int = 3) -> list[dict[str, Any]]:
    """Our Fréchet distance vs the scipy ``sqrtm`` formula on ``dim``-d statistics, and Inception
    feature throughput on CPU (random weights, uint8 256² inputs, batch ``inception_batch``).

    scipy's 2048-d sqrtm takes 25–115 s on 2-core CI machines, hence ``baseline_repeats=1`` by default.
    """
    rng = np.random.default_rng(0)
    mu1, s1 = _random_stats(rng, dim, dim + dim // 4, 0.0)
    mu2, s2 = _random_stats(rng, dim, dim + dim // 4, 0.1)
    t_ours, fd_ours = _median_time(lambda: frechet_distance(mu1, s1, mu2, s2), repeats)
    t_base, fd_base = _median_time(lambda: _fd_scipy_sqrtm(mu1, s1, mu2, s2), baseline_repeats)
    if abs(fd_ours - fd_base) > 1e-6 * abs(fd_base):
        raise AssertionError(f"FD mismatch: ours {fd_ours!r} vs scipy sqrtm {fd_base!r}")
    rows = [{"name": f"frechet_distance {dim}-d (eigh) vs scipy sqrtm", "ours": t_ours, "baseline": t_base,
             "ratio": t_base / t_ours, "target": 1.0, "unit": "s"}]
    if inception:
        rows.append(_bench_inception(inception_batch, inception_repeats))
    return rows


def _bench_inception(batch: int, repeats: int) -> dict[str, Any]:
    from selfflow.eval.extractor import exact_fp32
    from selfflow.eval.inception import FIDInceptionV3

    torch.manual_seed(0)
    model = FIDInceptionV3()  # random weights: speed does not depend on their values
    images = torch.randint(0, 256, (batch, 256, 256, 3), dtype=torch.uint8)
    baseline = _torch_fidelity_extractor(model)
    nchw = images.permute(0, 3, 1, 2).contiguous()
    t_ours: list[float] = []
    t_base: list[float] = []
    with torch.no_grad(), exact_fp32():
        model(images)  # warm-up (oneDNN primitive creation)
        if baseline is not None:
            baseline(nchw)
        for _ in range(max(1, repeats)):  # interleaved, so load from other processes hits both
            t_ours.append(_median_time(lambda: model(images), 1)[0])
            if baseline is not None:
                t_base.append(_median_time(lambda: baseline(nchw), 1)[0])
    ours = batch / statistics.median(t_ours)
    base = batch / statistics.median(t_base) if t_base else None
    return {"name": f"inception features (pool+spatial+logits) CPU batch {batch}, vs torch-fidelity",
            "ours": ours, "baseline": base, "ratio": None if base is None else ours / base,
            "target": 0.9, "unit": "img/s"}


def _torch_fidelity_extractor(model: torch.nn.Module) -> torch.nn.Module | None:
    """torch-fidelity's extractor with the same weights, if that (test-only) package is installed."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError:
        return None
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "w.pth")
        torch.save(model.state_dict(), path)
        return FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                           feature_extractor_weights_path=path)
