import os
import subprocess
import sys

import pytest

from selfflow.core import atomic
from selfflow.core.atomic import atomic_path, atomic_write_text


def test_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "a" / "f.txt"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two"
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.txt"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would create it, not mkstemp's 0o600


def test_a_failure_before_the_rename_keeps_the_old_content(tmp_path, monkeypatch):
    path = tmp_path / "f.txt"
    path.write_text("old")

    def killed(src, dst):  # the process dies between the write and the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_an_error_inside_the_block_keeps_the_old_content(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("writer failed")
    assert path.read_bytes() == b"old" and len(list(tmp_path.iterdir())) == 1


def test_a_process_killed_mid_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")
    code = ("import os, sys; from selfflow.core.atomic import atomic_path\n"
            "with atomic_path(sys.argv[1]) as tmp:\n"
            "    tmp.write_text('new, half written'); os.kill(os.getpid(), 9)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -9
    assert path.read_text() == "old"


def test_a_writer_that_recreates_the_file_still_gets_the_umask_mode(tmp_path):
    import torch
    from safetensors.torch import save_file

    umask = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "w.safetensors") as tmp:
            save_file({"a": torch.zeros(2)}, tmp)  # safetensors creates its file with mode 0o600
    finally:
        os.umask(umask)
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o644
