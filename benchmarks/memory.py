"""Peak memory of one training step (Self-Flow vs flow matching), CPU.

Method: each configuration runs in a fresh subprocess. After a warm-up step (which allocates gradients and
the AdamW moments), freed heap memory is returned to the OS (``malloc_trim``), the resident set size is
read (``VmRSS``), the kernel's peak-RSS counter is reset (``/proc/self/clear_refs`` ← 5) and one more
step runs; its peak is ``VmHWM``. Reported: the peak RSS of the process during the step, and the step's
transient part (peak − resident before the step: activations, autograd buffers, the teacher's
features). Medians over 3 steps (2 for the base model). Linux only; the numbers include the Python interpreter and torch.
A last step runs under the torch profiler for the live-tensor peak (:func:`live_peak_bytes`), the allocator-free
quantity a GPU reports, which the peak RSS exceeds by what malloc keeps.
"""

from __future__ import annotations

import ctypes
import json
import statistics
import subprocess
import sys
from pathlib import Path

from selfflow.core.plan import live_peak_bytes

from .timing import Row

ROOT = Path(__file__).resolve().parent.parent


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def measure(preset: str, batch: int, grid: int, channels: int, kind: str, steps: int = 3) -> dict:
    """Run in the worker process: peak and transient RSS (MB) of training steps of one configuration."""
    import gc

    from .train_step import _setup

    step, _, _ = _setup(preset, batch, grid, channels, kind)
    step()  # warm-up: gradients and optimizer state now exist
    libc = ctypes.CDLL("libc.so.6")
    peaks, transients = [], []
    for _ in range(steps):
        gc.collect()
        libc.malloc_trim(0)
        before = _status_kb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter (Linux ≥ 4.0)
        step()
        peak = _status_kb("VmHWM")
        peaks.append(peak / 1024)
        transients.append((peak - before) / 1024)
    live = live_peak_bytes(step) / 2**20
    return {"peak_mb": statistics.median(peaks), "transient_mb": statistics.median(transients), "live_mb": live}


def _run_worker(args: list[str]) -> dict:
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); from benchmarks.memory import measure; "
            "a = sys.argv[2:]; print(json.dumps(measure(a[0], *map(int, a[1:4]), a[4], int(a[5]))))")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT), *args], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def supported() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return hasattr(ctypes.CDLL("libc.so.6"), "malloc_trim")
    except (OSError, AttributeError):
        return False


def bench_memory(quick: bool) -> list[Row]:
    if not supported():
        return [Row("peak memory per training step: skipped (needs Linux /proc/self/clear_refs)", 0.0,
                    None, None, None, "MB")]
    rows = []
    for preset, batch, grid, ch, steps in (("tiny", 64, 8, 48, 3), ("base", 2, 16, 16, 2)):
        res = {kind: _run_worker([preset, str(batch), str(grid), str(ch), kind, str(steps)])
               for kind in ("self_flow", "flow_matching")}
        sf, fm = res["self_flow"], res["flow_matching"]
        tag = f"{preset} (B={batch}, L={grid * grid})"
        rows.append(Row(f"peak RSS during a train step {tag}: Self-Flow vs FM", sf["peak_mb"], fm["peak_mb"],
                        sf["peak_mb"] / fm["peak_mb"], None, "MB", "whole process (model, EMA, AdamW, activations)"))
        rows.append(Row(f"step transient memory {tag} (peak − resident before): Self-Flow vs FM",
                        sf["transient_mb"], fm["transient_mb"], sf["transient_mb"] / fm["transient_mb"], None,
                        "MB", "activations + autograd buffers + teacher features"))
        rows.append(Row(f"live tensor peak of a train step {tag} (torch profiler): Self-Flow vs FM",
                        sf["live_mb"], fm["live_mb"], sf["live_mb"] / fm["live_mb"], None, "MB",
                        "tensor bytes held at once above those before: a GPU's max_memory_allocated"))
    return rows
