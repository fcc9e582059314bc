"""``benchmarks/quality.py --smoke``: the whole study pipeline at toy size, resumable, in one process."""

from __future__ import annotations

import json

import pytest

from benchmarks import quality


@pytest.fixture
def quick_networks(tmp_path, monkeypatch):
    from selfflow.eval import digits_probe
    from selfflow.image import toy_encoder

    monkeypatch.setenv("SELFFLOW_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(toy_encoder, "TRAIN_STEPS", 5)
    train = digits_probe.train_digits_probe
    monkeypatch.setattr(digits_probe, "train_digits_probe", lambda **kw: train(steps=10, **kw))


def test_smoke_study_writes_table_curves_json_and_resumes(tmp_path, quick_networks, capsys):
    out = tmp_path / "study"
    assert quality.main(["--smoke", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert len(results["runs"]) == 6  # 3 methods × 2 seeds on digits
    assert {r["method"] for r in results["runs"]} == {"flow_matching", "repa", "self_flow"}
    run = results["runs"][0]
    assert [e["step"] for e in run["evals"]] == [2, 4] and run["linear_probe"]["blocks"] == [1, 2]
    assert run["final"]["num_samples"] == 24 and run["final"]["probe_fd"] > 0
    assert "repa" in results["datasets"]["digits"]["paired_vs_flow_matching"]
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG" and "### digits" in (out / "table.md").read_text()
    capsys.readouterr()
    assert quality.main(["--smoke", "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("finished earlier, skipped") == 6


def test_estimates_and_settings():
    full = quality.settings(quality.build_parser().parse_args([]))
    assert len(full["seeds"]) >= 5 and full["evals"] >= 6 and full["final_samples"] >= 2000
    assert quality.estimate_core_s(full) < 2 * 3600  # 60 minutes of 2 cores
    quick = quality.settings(quality.build_parser().parse_args(["--quick"]))
    assert quality.estimate_core_s(quick) < 2 * 600
    with pytest.raises(SystemExit, match="flow_matching"):
        quality.settings(quality.build_parser().parse_args(["--methods", "self_flow"]))
