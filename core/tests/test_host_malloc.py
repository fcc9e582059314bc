import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from selfflow.core import host_malloc
from selfflow.core.run_setup import set_torch_globals

CORE = Path(__file__).resolve().parents[1]
glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc"
                                or tuple(map(int, platform.libc_ver()[1].split(".")[:2])) < (2, 33),
                                reason="mallopt settings exist only in glibc; mallinfo2 since 2.33")

# One 20 MiB block allocated and freed; glibc's own account of it (mallinfo2, glibc >= 2.33). Page-fault counts
# would say the same less reliably: the kernel adds minor faults of its own now and then.
ACCOUNT = """
import ctypes
import torch
from selfflow.core.host_malloc import host_malloc_summary, keep_freed_memory
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = MallInfo2
on = keep_freed_memory()
before = mallinfo2()
block = torch.ones(5 << 20)
during = mallinfo2()
del block
after = mallinfo2()
mib = 1 << 20
print(on, during.hblks - before.hblks, (during.arena - before.arena) // mib, (during.arena - after.arena) // mib,
      after.fordblks // mib, host_malloc_summary())
"""


def _account(**env: str) -> tuple[str, int, int, int, int, str]:
    out = subprocess.run([sys.executable, "-c", ACCOUNT], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(CORE), **env}).stdout.split()
    return out[0], *map(int, out[1:5]), " ".join(out[5:])


@glibc_only
def test_a_freed_block_stays_in_the_heap():
    on, mapped, grown, trimmed, free, summary = _account()
    assert (on, summary) == ("True", "malloc keeps freed memory")
    assert mapped == 0  # served from the heap, not by mmap (glibc's default for a block this size)
    assert grown >= 20 and trimmed == 0  # the heap grew for it and did not shrink when it was freed
    assert free >= 20  # the freed block waits in the heap for the next step


@glibc_only
def test_the_variable_leaves_malloc_alone():
    on, *_, summary = _account(SELFFLOW_KEEP_FREED_MEMORY="0")
    assert (on, summary) == ("False", "default malloc")


def test_nothing_happens_off_glibc(monkeypatch):
    monkeypatch.setattr(host_malloc, "_applied", None)
    monkeypatch.setattr(host_malloc.platform, "libc_ver", lambda: ("", ""))
    assert host_malloc.keep_freed_memory() is False
    assert host_malloc.host_malloc_summary() == "default malloc"


def test_asked_once_per_process(monkeypatch):
    calls = []
    monkeypatch.setattr(host_malloc, "_applied", None)
    monkeypatch.setattr(host_malloc, "_mallopt", lambda: lambda param, value: calls.append(param) or 1)
    assert host_malloc.keep_freed_memory() and host_malloc.keep_freed_memory()
    assert calls == [host_malloc.M_MMAP_THRESHOLD, host_malloc.M_TRIM_THRESHOLD, host_malloc.M_TOP_PAD]


def test_a_refused_value_reports_off(monkeypatch):
    monkeypatch.setattr(host_malloc, "_applied", None)
    monkeypatch.setattr(host_malloc, "_mallopt", lambda: lambda param, value: 0)
    assert host_malloc.keep_freed_memory() is False


@pytest.mark.parametrize("device, asked", [("cpu", True), ("cuda", False)])
def test_cpu_runs_ask_for_it(monkeypatch, device, asked):
    calls = []
    monkeypatch.setattr("selfflow.core.run_setup.keep_freed_memory", lambda: calls.append(1))
    train = type("Train", (), {"num_threads": 0, "tf32": False})()
    set_torch_globals(train, torch.device(device))
    assert bool(calls) == asked
