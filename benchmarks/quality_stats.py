"""The statistics of ``make bench-quality``: t-intervals over seeds, paired differences, convergence speed-ups.

Seeds are the unit of replication: seed k gives every method the same initial backbone (since session 24; the
data order and evaluation noise are the same for every seed), so a method's effect is estimated from the
per-seed differences to the baseline (a paired t-interval), which removes the initialisation variance both
methods share (not the data-order or sampling-noise variance, which the seeds do not vary).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from scipy.stats import t as student_t


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """``(mean, low, high)``: the two-sided ``level`` Student-t confidence interval of the mean of
    ``values`` (n − 1 degrees of freedom); the bounds are NaN for fewer than two values."""
    values = [float(v) for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan, math.nan
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = student_t.ppf(0.5 + level / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def paired_difference(ours: dict[int, float], base: dict[int, float], level: float = 0.95
                      ) -> tuple[float, float, float, int]:
    """``(mean, low, high, n)`` of ``ours[seed] − base[seed]`` over the seeds both have."""
    diffs = [ours[s] - base[s] for s in sorted(ours) if s in base]
    return (*t_interval(diffs, level), len(diffs))


def steps_to_reach(curve: Sequence[tuple[float, float]], target: float, lower_is_better: bool = True
                   ) -> float | None:
    """The first training step at which ``curve`` (``(step, value)`` sorted by step) reaches ``target``,
    linearly interpolated between the two evaluations that bracket the crossing; None if it never does."""
    better = (lambda v: v <= target) if lower_is_better else (lambda v: v >= target)
    prev = None
    for step, value in curve:
        if better(value):
            if prev is None:
                return float(step)
            (s0, v0) = prev
            return s0 + (step - s0) * (target - v0) / (value - v0)  # v0 misses, value reaches: value ≠ v0
        prev = (step, value)
    return None


def speedup(baseline: Sequence[tuple[float, float]], method: Sequence[tuple[float, float]],
            lower_is_better: bool = True, baseline_s_per_step: float = 1.0, method_s_per_step: float = 1.0
            ) -> dict[str, float | bool]:
    """How much faster ``method`` reaches its own final value than ``baseline`` does.

    ``steps``: baseline steps to reach the method's final value ÷ the method's final step (equal steps);
    ``wall``: the same in seconds, each side's steps times its seconds per step (equal wall-clock). When the
    baseline never gets there, both are lower bounds computed at its last evaluation (``lower_bound``)."""
    final_step, final_value = method[-1]
    reached = steps_to_reach(baseline, final_value, lower_is_better)
    base_steps = baseline[-1][0] if reached is None else reached
    ratio = base_steps / final_step
    return {"steps": ratio, "wall": ratio * baseline_s_per_step / method_s_per_step,
            "baseline_steps": base_steps, "target": final_value, "lower_bound": reached is None}
