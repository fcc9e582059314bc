"""``make gpu-check``'s speed script on a machine without CUDA: it says so, writes nothing and exits 0."""

import subprocess
import sys
from pathlib import Path

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
    assert [(r["arch"], r["checkpointing"], r["kind"]) for r in rows] == [
        (arch, ckpt, kind) for arch in ("dit", "mmdit") for ckpt in (False, True)
        for kind in ("flow_matching", "self_flow")]
    assert all(r["images_per_s"] > 0 and r["tflops"] > 0 for r in rows)
    sampling = result["sampling"]
    assert sampling["images_per_s"] > 0 and sampling["ratio_to_bound"] > 0
