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
glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="mallopt settings exist only in glibc")

# A step that allocates, touches and frees 8 × 20 MiB; faults per step after two warm-ups.
FAULTS = """
import resource, sys
import torch
from selfflow.core.host_malloc import host_malloc_summary, keep_freed_memory
on = keep_freed_memory() if sys.argv[1] == "keep" else False
def step():
    blocks = [torch.ones(5 << 20) for _ in range(8)]
    del blocks
step(); step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(on, host_malloc_summary(), (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


def _run(mode: str, **env: str) -> tuple[str, str, float]:
    out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(CORE), **env}).stdout.split()
    return out[0], " ".join(out[1:-1]), float(out[-1])


@glibc_only
def test_kept_memory_is_not_faulted_in_again():
    on, summary, faults = _run("keep")
    assert (on, summary) == ("True", "malloc keeps freed memory")
    # 160 MiB a step is 40,960 pages: glibc's default trims part of it back and faults it in again each step
    # (~1,000 faults a step where this was written); kept, the next step reuses the same pages
    assert faults < 64


@glibc_only
def test_the_variable_leaves_malloc_alone():
    on, summary, _ = _run("keep", SELFFLOW_KEEP_FREED_MEMORY="0")
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
