import math

import pytest

from benchmarks.quality_stats import paired_difference, speedup, steps_to_reach, t_interval


def test_t_interval_matches_a_hand_computation():
    # mean 2, sample std 1, n = 3: half-width t_{0.975, 2} · 1/√3 = 4.302653 · 0.577350 = 2.484138
    mean, low, high = t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert low == pytest.approx(2 - 2.484138, abs=1e-5)
    assert high == pytest.approx(2 + 2.484138, abs=1e-5)


def test_t_interval_of_one_value_has_no_bounds():
    mean, low, high = t_interval([5.0])
    assert mean == 5.0 and math.isnan(low) and math.isnan(high)


def test_paired_difference_uses_matching_seeds_only():
    # differences 1, 2, 3 (seed 9 has no baseline): mean 2, std 1, n 3
    mean, low, high, n = paired_difference({0: 11.0, 1: 22.0, 2: 33.0, 9: 0.0}, {0: 10.0, 1: 20.0, 2: 30.0})
    assert (mean, n) == (2.0, 3)
    assert (mean - low, high - mean) == pytest.approx((2.484138, 2.484138), abs=1e-5)


def test_paired_difference_removes_the_shared_seed_variance():
    base = {0: 100.0, 1: 200.0, 2: 300.0, 3: 400.0, 4: 500.0}
    ours = {s: v - 10 for s, v in base.items()}  # always exactly 10 better
    mean, low, high, n = paired_difference(ours, base)
    assert (mean, low, high, n) == (-10.0, -10.0, -10.0, 5)


def test_steps_to_reach_interpolates_between_evaluations():
    curve = [(100, 50.0), (200, 30.0), (300, 10.0)]
    assert steps_to_reach(curve, 20.0) == 250.0  # halfway from 30 (step 200) to 10 (step 300)
    assert steps_to_reach(curve, 60.0) == 100.0  # already there at the first evaluation
    assert steps_to_reach(curve, 5.0) is None
    acc = [(100, 0.2), (200, 0.6)]
    assert steps_to_reach(acc, 0.5, lower_is_better=False) == 175.0


def test_speedup_at_equal_steps_and_equal_wall_clock():
    fm = [(100, 50.0), (200, 30.0), (300, 10.0), (400, 5.0)]
    sf = [(100, 40.0), (200, 20.0)]  # reaches 20 at step 200; FM reaches 20 at step 250
    out = speedup(fm, sf, baseline_s_per_step=1.0, method_s_per_step=1.25)
    assert out["steps"] == 1.25 and out["wall"] == 1.0 and out["lower_bound"] is False


def test_speedup_is_a_lower_bound_when_the_baseline_never_gets_there():
    out = speedup([(100, 50.0), (200, 30.0)], [(100, 25.0)])
    assert out["steps"] == 2.0 and out["lower_bound"] is True
