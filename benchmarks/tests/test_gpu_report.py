"""``make gpu-check``'s report, judged from made-up rows (no GPU needed)."""

import pytest

from benchmarks.gpu_report import judge, print_targets


def test_the_gpu_targets_are_judged_from_the_rows(capsys):
    def row(kind, compile_, images, tflops, ckpt=False):
        return {"arch": "dit", "kind": kind, "compile": compile_, "checkpointing": ckpt, "images_per_s": images,
                "tflops": tflops}

    result = {"train": [row("flow_matching", False, 100, 300), row("self_flow", False, 70, 330),
                        row("flow_matching", True, 120, 360), row("self_flow", True, 100, 400),
                        row("flow_matching", False, 300, 999, ckpt=True),  # checkpointing is not judged
                        {"arch": "mmdit", "kind": "flow_matching", "compile": False, "checkpointing": False,
                         "error": "RuntimeError: out of memory"}],
              "sampling": {"ratio_to_bound": 0.85}}
    mfu, ratio, sampling = judge(result, peak=800.0)
    assert "(compiled)" in mfu["target"] and mfu["value"] == pytest.approx(0.45) and mfu["ok"]
    assert ratio["value"] == pytest.approx(1.2) and ratio["ok"]
    assert sampling["value"] == 0.85 and sampling["ok"] is False
    nothing = judge({"train": [], "sampling": {"error": "x"}}, peak=800.0)
    assert [t["ok"] for t in nothing] == [None, None, None]
    print_targets([*nothing, sampling])
    assert "not measured (target >= 40 %): -" in capsys.readouterr().out
