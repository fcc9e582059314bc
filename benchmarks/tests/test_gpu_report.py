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
    # the compiled pair timed in alternating rounds, when measured, decides the ratio target
    result["alternating"] = {"rounds": 7, "ratio": 1.26}
    ratio = judge(result, peak=800.0)[1]
    assert ratio["value"] == 1.26 and ratio["ok"] is False and "(compiled, 7 alternating rounds)" in ratio["target"]
    nothing = judge({"train": [], "sampling": {"error": "x"}}, peak=800.0)
    assert [t["ok"] for t in nothing] == [None, None, None]
    print_targets([*nothing, sampling])
    assert "not measured (target >= 40 %): -" in capsys.readouterr().out


def test_the_table_sets_the_loader_against_the_step(capsys):
    from benchmarks.gpu_report import print_table

    loader = {"samples_per_s": {"1": 1834.2, "4": 6000.0}, "per_worker": 1834.2, "pinned": True,
              "step_images_per_s": 2250.7, "workers_needed": 2}
    print_table({"train": [], "sampling": {"error": "x"}, "loader": loader}, peak=1.0)
    out = capsys.readouterr().out
    assert ("samples/s: 1 worker(s) 1,834, 4 worker(s) 6,000; the fastest SiT-XL/2 step consumes 2,251 images/s: "
            "2 worker(s) per GPU keep it fed") in out and "pinned → GPU" in out
    print_table({"train": [], "sampling": {"error": "x"}, "loader": {"error": "OSError: disk full"}}, peak=1.0)
    assert "data loader not measured: OSError: disk full" in capsys.readouterr().out



def test_the_table_says_how_the_steps_were_timed(capsys):
    from benchmarks.gpu_report import print_table

    def row(kind, images):
        return {"arch": "dit", "kind": kind, "compile": True, "checkpointing": False, "batch": 64,
                "images_per_s": images, "tflops": 400.0, "peak_gib": 30.0, "plan_gib": 36.0}

    print_table({"train": [row("flow_matching", 550.0), row("self_flow", 440.0)], "sampling": {"error": "x"}},
                peak=800.0)
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("dit"))
    assert line.split()[3:6] == ["550.0", "440.0", "1.25"]
    assert "back to back, waiting only for the host's reads" in out
    alternating = {"rounds": 7, "batch": 64, "flow_matching_s": 0.1291, "self_flow_s": 0.1590, "ratio": 1.2316,
                   "round_ratios": [1.218, 1.241]}
    print_table({"train": [], "sampling": {"error": "x"}, "alternating": alternating}, peak=800.0)
    assert ("SiT-XL/2 compiled, flow matching and Self-Flow in 7 alternating rounds (B=64): 129.1 vs 159.0 ms a "
            "step = 1.232x (rounds 1.218-1.241)") in capsys.readouterr().out
