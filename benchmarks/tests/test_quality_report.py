"""Aggregation, table and plot of ``make bench-quality`` (benchmarks/quality.py) on synthetic records."""

from __future__ import annotations

import math

import pytest

from benchmarks.quality_report import (
    aggregate,
    markdown_table,
    paired_differences,
    plot_curves,
    read_evals,
)


def _run(method: str, seed: int, fds: list[float], accs: list[float], wall: float = 10.0) -> dict:
    evals = [{"step": 10 * (i + 1), "probe_fd": f, "probe_acc": a} for i, (f, a) in enumerate(zip(fds, accs))]
    return {"method": method, "seed": seed, "evals": evals, "wall_s": wall, "steps": 10 * len(fds)}


RUNS = [_run("flow_matching", 0, [100, 50], [0.2, 0.4]), _run("flow_matching", 1, [110, 60], [0.3, 0.5]),
        _run("self_flow", 0, [90, 40], [0.3, 0.6], 13.0), _run("self_flow", 1, [100, 44], [0.3, 0.7], 13.0),
        _run("self_flow_no_rep", 0, [95], [0.25])]  # unfinished: one evaluation so far


def test_read_evals_keeps_only_eval_records_sorted():
    records = [{"step": 20, "loss": 1.0}, {"step": 20, "probe_fd": 5.0, "probe_acc": 0.5},
               {"step": 10, "probe_fd": 7.0, "probe_acc": 0.1}]
    assert read_evals(records) == [{"step": 10, "probe_fd": 7.0, "probe_acc": 0.1},
                                   {"step": 20, "probe_fd": 5.0, "probe_acc": 0.5}]


def test_aggregate_mean_and_sample_std_over_seeds():
    s = aggregate(RUNS, ["flow_matching", "self_flow", "self_flow_no_rep", "self_flow_no_mask"])
    assert list(s) == ["flow_matching", "self_flow", "self_flow_no_rep"]  # absent methods are dropped
    mean, std = s["flow_matching"]["final"]["probe_fd"]
    assert mean == 55 and std == pytest.approx(math.sqrt(50))
    assert s["self_flow"]["curve"]["probe_acc"][1][:2] == (20, pytest.approx(0.65))
    assert s["self_flow_no_rep"]["final"]["probe_fd"] == (95, 0.0)
    assert s["self_flow"]["wall_s"] == (13.0, 0.0)


def test_paired_differences_at_last_common_step():
    d = paired_differences(RUNS, "flow_matching")
    mean, std, n = d["self_flow"]["probe_fd"]
    assert (mean, n) == (-13, 2) and std == pytest.approx(math.sqrt(2) * 3)
    assert d["self_flow_no_rep"]["probe_fd"] == (-5, 0.0, 1)  # compared at step 10, the only common one


def test_table_and_plot(tmp_path):
    s = aggregate(RUNS)
    table = markdown_table(s, paired_differences(RUNS, "flow_matching"), "FM", {"self_flow": "Self-Flow"})
    assert "| Self-Flow | 2 | 20 | 42.0 ± 2.8 | 0.650 ± 0.071 | -13.0 ± 4.2 |" in table
    assert "step 20" in table
    png = plot_curves(s, tmp_path / "curves.png", title="t")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_final_never_mixes_steps():
    runs = [_run("self_flow", 0, [90, 40], [0.3, 0.6]), _run("self_flow", 1, [100], [0.3])]  # seed 1 unfinished
    s = aggregate(runs)["self_flow"]
    assert (s["final_step"], s["final_n"], s["final"]["probe_fd"]) == (20, 1, (40, 0.0))
