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
