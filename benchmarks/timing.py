"""Timing helpers for ``make bench``: medians of repeated calls, ours and baseline interleaved."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch


@dataclass
class Row:
    """One line of the benchmark table. ``ratio`` is oriented so that larger is better for us when
    ``higher_is_better`` and smaller is better otherwise; ``target`` is the bound the issue asks for."""

    name: str
    ours: float
    baseline: float | None
    ratio: float | None
    target: str | None
    unit: str
    note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1, device: str = "cpu") -> float:
    """Median seconds of ``fn`` over ``repeats`` calls after ``warmup``; on ``device="cuda"`` each timing waits
    for the GPU's queued work (kernels run asynchronously)."""
    return steady_time(fn, repeats, 1, warmup, device)


def steady_time(fn: Callable[[], object], repeats: int, steps: int, warmup: int = 1, device: str = "cpu") -> float:
    """Seconds per call of ``fn`` in a training loop's steady state: the median over ``repeats`` rounds of
    ``steps`` calls in a row, waiting for the GPU once per round. Unlike :func:`median_time`, the host queues
    the next call's first kernels while the GPU still runs this one's last, as it does in ``selfflow train``
    (whose only waits are the host reads inside a step)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        sync()
        times.append((time.perf_counter() - t0) / steps)
    return statistics.median(times)


def paired_median(ours: Callable[[], object], base: Callable[[], object], repeats: int,
                  warmup: int = 1) -> tuple[float, float]:
    """Median seconds of ``ours`` and ``base``, alternating calls so background load hits both alike."""
    return tuple(interleaved_medians((ours, base), repeats, warmup))


def interleaved_times(fns: Sequence[Callable[[], object]], repeats: int, warmup: int = 1) -> list[list[float]]:
    """Seconds of every call of each of ``fns`` (``repeats`` per function), called in turn each round so
    background load hits all alike: ``times[i][r]`` is function ``i`` in round ``r``, so a ratio can be read per
    round as well as of the medians."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, seconds in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            fn()
            seconds.append(time.perf_counter() - t0)
    return times


def interleaved_medians(fns: Sequence[Callable[[], object]], repeats: int, warmup: int = 1) -> list[float]:
    """Median seconds of each of ``fns``, called in turn each round (:func:`interleaved_times`)."""
    return [statistics.median(s) for s in interleaved_times(fns, repeats, warmup)]


def round_ratio_range(numerators: Sequence[float], denominators: Sequence[float]) -> tuple[float, float]:
    """Lowest and highest per-round ratio of two interleaved timings: the spread inside one run, beside the
    ratio of their medians. Rounds that do not pair up raise."""
    ratios = [a / b for a, b in zip(numerators, denominators, strict=True)]
    return min(ratios), max(ratios)


def gemm_peak_gflops(sizes: tuple[int, ...] = (1024, 2048), repeats: int = 7) -> float:
    """Measured fp32 matmul throughput of this machine (GFLOP/s), the MFU reference on CPU: the best
    median over a few square sizes (a single size under-reads when the machine is briefly busy)."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        t = median_time(lambda a=a, b=b: a @ b, repeats, warmup=2)
        best = max(best, 2 * n**3 / t / 1e9)
    return best
