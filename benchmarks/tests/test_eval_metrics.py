from __future__ import annotations

import math

from benchmarks.eval_metrics import bench_fd


def test_bench_fd_rows() -> None:
    rows = bench_fd(dim=64, repeats=1, inception_batch=2, inception_repeats=1)
    assert [r["name"].split()[0] for r in rows] == ["frechet_distance", "inception"]
    for r in rows:
        assert set(r) == {"name", "ours", "baseline", "ratio", "target", "unit"}
        assert r["ours"] > 0 and r["baseline"] > 0 and math.isfinite(r["ratio"])
    fd, inc = rows
    assert fd["unit"] == "s" and fd["ratio"] == fd["baseline"] / fd["ours"]
    assert inc["unit"] == "img/s" and inc["ratio"] == inc["ours"] / inc["baseline"]
