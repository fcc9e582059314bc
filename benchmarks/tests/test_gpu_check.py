"""``make gpu-check``'s speed script on a machine without CUDA: it says so, writes nothing and exits 0."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_without_cuda_it_says_so_and_exits_0(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_check.py")], cwd=tmp_path,
                         env={"CUDA_VISIBLE_DEVICES": "", "PATH": ""}, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "no CUDA device" in out.stdout
    assert not (tmp_path / "bench-gpu.json").exists()


def test_the_measuring_code_runs_tiny_on_the_cpu():
    """Every case the GPU run times (eager and activation-checkpointed steps of both models and both objectives,
    SDE sampling with guidance) runs end to end at tiny size, so a lent GPU's minutes are not lost to a bug."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.gpu_check import Sizes, measure

    result = measure(Sizes.smoke(), compile_modes=(False,))
    rows = result["train"]
    assert [(r["checkpointing"], r["arch"], r["kind"]) for r in rows] == [
        (ckpt, arch, kind) for ckpt in (False, True) for arch in ("dit", "mmdit")
        for kind in ("flow_matching", "self_flow")]
    assert all(r["images_per_s"] > 0 and r["tflops"] > 0 for r in rows)
    # selfflow plan's prediction for each case (compared with the GPU's peak there): more with a teacher and
    # without activation checkpointing
    plan = {(r["arch"], r["checkpointing"], r["kind"]): r["plan_gib"] for r in rows}
    for arch in ("dit", "mmdit"):
        assert plan[arch, False, "self_flow"] > plan[arch, False, "flow_matching"] > 0
        assert plan[arch, True, "self_flow"] <= plan[arch, False, "self_flow"]  # equal when gradients dominate
    sampling = result["sampling"]
    assert sampling["images_per_s"] > 0 and sampling["ratio_to_bound"] > 0
    # the bound counts each call at its batch: 3 SDE steps at RF t = 1, ~0.52, 0.04, guided on [0, 0.7]
    assert (sampling["model_calls"], sampling["guided_calls"]) == (3, 2)
    pair = result["xl2_vs_naive"]  # ours vs the naive official-class step, bf16, against its FLOP bound
    assert pair["ours_s"] > 0 and pair["naive_s"] > 0 and pair["flop_bound"] > 1
    # the ImageNet stream with a DataLoader worker against the fastest SiT step of the run (also those measured
    # after it: the compiled and activation-checkpointed ones)
    loader = result["loader"]
    assert loader["samples_per_s"]["1"] > 0 and loader["per_worker"] == loader["samples_per_s"]["1"]
    fastest = max(r["images_per_s"] for r in rows if r["arch"] == "dit")
    assert loader["step_images_per_s"] == fastest and not loader["pinned"]
    assert loader["workers_needed"] == -(-fastest // loader["per_worker"])


def test_the_batch_is_sized_to_the_gpu_by_the_plan():
    """The training batch halves from 64 until selfflow plan fits both models' Self-Flow step in the share of the
    GPU's memory a plan may fill, and stops at 8; the other sizes are kept."""
    sys.path.insert(0, str(ROOT))
    from dataclasses import replace

    from benchmarks.gpu_check import Sizes, case_plan, sized_to_memory
    from selfflow.core.plan import USABLE_FRACTION

    sizes = replace(Sizes.smoke(), batch=64)
    plans = [case_plan(arch, "self_flow", sizes) for arch in ("dit", "mmdit")]

    def need(batch: int) -> float:  # the memory at which ``batch`` just fits
        return max(p.gpu_memory("none", 1, batch, False) for p in plans) / USABLE_FRACTION

    assert sized_to_memory(sizes, need(64)) == sizes  # fits: unchanged (never raised above the start)
    assert sized_to_memory(sizes, 100 * need(64)).batch == 64
    assert sized_to_memory(sizes, need(16) * 1.001).batch == 16
    assert sized_to_memory(sizes, need(16) * 0.999).batch == 8
    assert sized_to_memory(sizes, 1.0).batch == 8  # nothing fits: the smallest batch, left to be measured or fail
    assert sized_to_memory(Sizes.smoke(), 1.0).batch == 2  # a start below 8 is kept
    assert sized_to_memory(sizes, need(16)).sample_batch == sizes.sample_batch


def test_a_failing_case_is_recorded_and_the_rest_still_run(monkeypatch, capsys):
    """One GPU run is all there is: an error in one case (out of memory, a compile error) must not lose the
    others, and once the time budget is spent the remaining cases are recorded as skipped."""
    sys.path.insert(0, str(ROOT))
    import benchmarks.gpu_check as gc

    real = gc.train_case

    def flaky(arch, kind, *args):
        if arch == "mmdit" and kind == "self_flow":
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
        return real(arch, kind, *args)

    monkeypatch.setattr(gc, "train_case", flaky)
    seen = []
    result = gc.measure(gc.Sizes.smoke(), compile_modes=(False,), on_row=lambda section, row, so_far: seen.append(section))
    rows = result["train"]
    assert [r.get("error") for r in rows] == [None, None, None, "RuntimeError: CUDA out of memory. Tried to "
                                              "allocate 2.00 GiB"] * 2
    assert all(r["images_per_s"] > 0 for r in rows if "error" not in r)
    assert result["sampling"]["images_per_s"] > 0 and seen.count("sampling") == 1 and seen.count("train") == 8
    assert seen.count("xl2_vs_naive") == seen.count("loader") == 1
    from benchmarks.gpu_report import print_table

    print_table(result, peak=1.0)  # the final table names the failed case instead of stopping at it
    assert "(not measured: RuntimeError: CUDA out of memory" in capsys.readouterr().out
    spent = gc.measure(gc.Sizes.smoke(), compile_modes=(False,), budget_s=0.0)
    assert all(r["skipped"].startswith("time budget")
               for r in [*spent["train"], spent["sampling"], spent["xl2_vs_naive"], spent["loader"]])


def test_the_compiled_cases_run_tiny_on_the_cpu():
    """The compiled training cases too, and the compiled pair in alternating rounds (TorchDynamo's tracing is
    shared by the CPU and GPU backends, so a graph error shows here; ~1 min of compilation)."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.gpu_check import Sizes, measure

    result = measure(Sizes.smoke(), compile_modes=(True,))
    rows = result["train"]
    assert [(r["compile"], r["checkpointing"]) for r in rows] == [(True, False)] * 4
    assert all(r.get("images_per_s", 0) > 0 for r in rows), [r.get("error") for r in rows]
    # and the ratio target: compiled SiT flow matching and Self-Flow, held at once, in alternating rounds
    pair = result["alternating"]
    assert pair.get("rounds") == 2, pair.get("error")
    low, high = pair["round_ratios"]
    assert pair["ratio"] == pytest.approx(pair["self_flow_s"] / pair["flow_matching_s"]) and 0 < low <= high


def test_a_case_is_freed_before_the_next_one(monkeypatch):
    """A case's objects kept alive by a reference cycle (a compiled module, a failed case's traceback) would
    count in the next case's peak memory: ``measure`` collects them between cases (automatic collection off
    here, so the test cannot pass by chance)."""
    import gc
    import weakref

    import benchmarks.gpu_check as check

    alive = []

    class Model:  # stands in for a case's model, in a cycle with itself
        def __init__(self):
            self.me = self

    def case(arch, kind, *args):
        if alive:
            assert alive[-1]() is None, "the previous case's model is still alive"
        model = Model()
        alive.append(weakref.ref(model))
        return {"images_per_s": 1.0}

    monkeypatch.setattr(check, "train_case", case)
    monkeypatch.setattr(check, "sampling_case", lambda sizes: {})
    monkeypatch.setattr(check, "xl2_vs_naive_case", lambda sizes: {})
    monkeypatch.setattr(check, "loader_case", lambda sizes, rows: {})
    gc.disable()
    try:
        rows = check.measure(check.Sizes.smoke(), compile_modes=(False,))["train"]
    finally:
        gc.enable()
    assert [r.get("error") for r in rows] == [None] * 8 and len(alive) == 8


def test_a_failing_planner_loses_no_measurement(monkeypatch):
    """The planner's prediction and the batch sizing are extras of the GPU run: when they fail, the row keeps
    its measured speed (the error beside it) and the check runs at its start batch."""
    import benchmarks.gpu_check as check

    def broken(*args):
        raise RuntimeError("meta tensor has no data\nmore")

    monkeypatch.setattr(check, "planned_peak", broken)
    row = check.train_case("dit", "flow_matching", False, False, check.Sizes.smoke())
    assert row["images_per_s"] > 0 and row["plan_error"] == "RuntimeError: meta tensor has no data"
    start = check.Sizes.smoke()
    sizes, how = check.gpu_sizes(start, 1e15)
    assert sizes == start and how.startswith("training batch 2: the largest (halving from GPU_CHECK_BATCH")
    monkeypatch.setattr(check, "case_plan", broken)
    sizes, how = check.gpu_sizes(start, 80e9)
    assert sizes == start and how == "training batch 2: not sized by selfflow plan (RuntimeError: meta tensor has no data)"


@pytest.mark.skipif(shutil.which("make") is None or shutil.which("timeout") is None, reason="needs make, timeout")
def test_hung_cuda_tests_leave_the_speed_table_its_time(tmp_path):
    """``make gpu-check``'s recipe on a copy of the Makefile, with a stand-in python whose pytest hangs: the
    tests are stopped after GPU_TESTS_TIMEOUT_S, the speed table still runs, and the target fails."""
    shutil.copy(ROOT / "Makefile", tmp_path)
    (tmp_path / "gpu-wheels").mkdir()
    python = tmp_path / ".venv-gpu" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text('#!/bin/sh\ncase "$1 $2" in\n  "-m pytest") exec sleep 60 ;;\n'
                      '  "benchmarks/gpu_check.py ") echo "speed table ran" ;;\nesac\nexit 0\n')
    python.chmod(0o755)
    out = subprocess.run(["make", "gpu-check-cuda", "GPU_TESTS_TIMEOUT_S=1"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode != 0
    assert "the cuda tests were stopped after 1 s" in out.stdout and "speed table ran" in out.stdout
