"""The root Makefile's ``make setup``: a new venv is refused up front, naming the free space, where the disk
cannot hold it (CI once failed with pip's "No space left on device" halfway through the torch install)."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_setup_names_the_free_space_before_creating_a_venv(tmp_path):
    shutil.copy(ROOT / "Makefile", tmp_path)
    for package in ("core", "text", "image", "video", "audio", "robotics", "eval"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "pyproject.toml").touch()

    def setup(min_free_gb: int) -> subprocess.CompletedProcess:  # PYTHON=false: never builds a venv here
        return subprocess.run(["make", "setup", f"SETUP_MIN_FREE_GB={min_free_gb}", "PYTHON=false"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)

    refused = setup(10**9)
    assert refused.returncode != 0
    assert "GB free on" in refused.stderr and "the venv needs about 7 GB" in refused.stderr
    assert "SETUP_MIN_FREE_GB=0" in refused.stderr
    passed = setup(0)  # the check passes; the (false) interpreter then fails to make the venv
    assert passed.returncode != 0 and "GB free on" not in passed.stderr
