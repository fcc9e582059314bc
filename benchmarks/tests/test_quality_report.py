"""Aggregation, tables and plot of ``make bench-quality`` (benchmarks/quality.py) on synthetic records."""

from __future__ import annotations

import math

import pytest

from benchmarks.quality_report import (
    aggregate,
    lp_best,
    markdown_table,
    paired_differences,
    plot_curves,
    read_evals,
    speedups,
)


def _run(method: str, seed: int, fds: list[float], accs: list[float], s_per_step: float = 1.0,
         lp: float | None = None) -> dict:
    evals = [{"step": 10 * (i + 1), "probe_fd": f, "probe_acc": a} for i, (f, a) in enumerate(zip(fds, accs))]
    probe = {"accuracy": {"1": {"0.0": lp / 2, "0.5": lp / 4}, "2": {"0.0": lp, "0.5": lp / 3}}} if lp else None
    return {"method": method, "seed": seed, "evals": evals, "s_per_step": s_per_step, "steps": 10 * len(fds),
            "linear_probe": probe}


RUNS = [_run("flow_matching", 0, [100, 50], [0.2, 0.4], lp=0.5), _run("flow_matching", 1, [110, 60], [0.3, 0.5], lp=0.6),
        _run("self_flow", 0, [90, 40], [0.3, 0.6], 1.3, lp=0.7), _run("self_flow", 1, [100, 44], [0.3, 0.7], 1.3, lp=0.9),
        _run("self_flow_no_rep", 0, [95], [0.25])]  # unfinished: one evaluation so far, no linear probe


def test_read_evals_keeps_only_eval_records_sorted():
    records = [{"step": 20, "loss": 1.0}, {"step": 20, "probe_fd": 5.0, "probe_acc": 0.5},
               {"step": 10, "probe_fd": 7.0, "probe_acc": 0.1}]
    assert read_evals(records) == [{"step": 10, "probe_fd": 7.0, "probe_acc": 0.1},
                                   {"step": 20, "probe_fd": 5.0, "probe_acc": 0.5}]


def test_aggregate_means_with_t_intervals_over_seeds():
    s = aggregate(RUNS, ["flow_matching", "self_flow", "self_flow_no_rep", "self_flow_no_mask"])
    assert list(s) == ["flow_matching", "self_flow", "self_flow_no_rep"]  # absent methods are dropped
    mean, low, high, n = s["flow_matching"]["final"]["probe_fd"]
    half = 12.7062 * math.sqrt(50) / math.sqrt(2)  # t(0.975, 1 dof) · sd / √n
    assert (mean, n) == (55, 2) and (low, high) == pytest.approx((55 - half, 55 + half), rel=1e-5)
    assert s["self_flow"]["curve"]["probe_acc"][1][:2] == (20, pytest.approx(0.65))
    assert s["self_flow_no_rep"]["final"]["probe_fd"][0] == 95 and math.isnan(s["self_flow_no_rep"]["final"]["probe_fd"][1])
    assert s["self_flow"]["lp"]["2"]["0.0"][0] == pytest.approx(0.8) and s["self_flow"]["lp_best"][0] == pytest.approx(0.8)
    assert s["self_flow"]["s_per_step"][0] == pytest.approx(1.3)


def test_lp_best_is_the_best_block_and_level():
    assert lp_best(RUNS[0]) == 0.5 and math.isnan(lp_best(RUNS[-1]))


def test_paired_differences_at_last_common_step_with_intervals():
    d = paired_differences(RUNS, "flow_matching")
    mean, low, high, n = d["self_flow"]["probe_fd"]
    assert (mean, n, d["self_flow"]["step"]) == (-13, 2, 20) and low < mean < high
    assert d["self_flow"]["lp_acc_best"][0] == pytest.approx(0.25)
    assert d["self_flow_no_rep"]["probe_fd"][:1] == (-5,) and d["self_flow_no_rep"]["step"] == 10


def test_the_final_evaluation_replaces_the_last_online_one_when_every_run_has_it():
    runs = [{**r, "final": {"probe_fd": r["evals"][-1]["probe_fd"] - 10, "probe_acc": 0.5}} for r in RUNS[:4]]
    assert aggregate(runs, ["flow_matching"])["flow_matching"]["final"]["probe_fd"][0] == 45
    d = paired_differences(runs, "flow_matching")["self_flow"]
    assert d["step"] == "final" and d["probe_fd"][0] == -13 and d["probe_acc"][0] == 0


def test_speedups_at_equal_steps_and_wall_clock():
    sp = speedups(RUNS, "flow_matching")["self_flow"]
    # seed 0: FM reaches 40 never (last eval 50): lower bound 20/20 = 1; seed 1: 44 never reached either
    assert sp["lower_bounds"] == 2 and sp["steps"][0] == pytest.approx(1.0)
    assert sp["wall"][0] == pytest.approx(1.0 / 1.3)
    faster = speedups([_run("flow_matching", 0, [100, 50, 40, 30], [0] * 4), _run("self_flow", 0, [40, 30], [0] * 2)],
                      "flow_matching")["self_flow"]
    assert faster["steps"][0] == pytest.approx(2.0) and faster["lower_bounds"] == 0  # FM needs 40 steps for 30


def test_table_and_plot(tmp_path):
    s = aggregate(RUNS, ["flow_matching", "self_flow", "self_flow_no_rep"])
    d, sp = paired_differences(RUNS, "flow_matching"), speedups(RUNS, "flow_matching")
    table = markdown_table(s, d, sp, "flow_matching", {"self_flow": "Self-Flow", "flow_matching": "FM"})
    assert "| Self-Flow | 2 | 42.0 [" in table and "Δ FD vs FM" in table and "-13.0 [" in table
    assert "| block 1 | block 2 |" in table and "step 20" in table
    png = plot_curves({"digits": s, "shapes": s}, tmp_path / "curves.png", title="t")
    assert png.read_bytes()[:4] == b"\x89PNG"
