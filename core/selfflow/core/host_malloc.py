"""Keep freed host memory in the process between CPU training steps (glibc ``malloc`` settings).

A CPU training step allocates and frees the same large blocks every step: activations, autograd buffers and,
with ``zero_grad(set_to_none=True)``, every gradient (2.7 GB at SiT-XL/2). glibc's default serves a large
block with ``mmap`` and unmaps it on ``free``, or trims the heap's free top back to the kernel, so the next
step faults the same memory in again, page by page, each page zeroed by the kernel. At SiT-XL/2 (B=2, fp32, 2
threads) that was 17–58k page faults a step (3–5k with the settings below), and our Self-Flow step ran ~1 %
faster with them, inside the run-to-run spread (docs/BENCHMARKS.md "Session 32").

:func:`keep_freed_memory` asks glibc to serve every block up to its ceiling (32 MiB on 64-bit, which covers
each of SiT-XL/2's tensors) from the heap and never to trim it: the process keeps its peak footprint, as a
caching allocator (PyTorch's on CUDA, jemalloc, tcmalloc) does, and a step reuses the last step's pages.
The trainer calls it for CPU runs (:func:`.run_setup.set_torch_globals`) and ``make bench`` at its start.
``SELFFLOW_KEEP_FREED_MEMORY=0`` leaves malloc as it is. Elsewhere than glibc (macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import os
import platform

# mallopt(3) parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit (HEAP_MAX_SIZE / 2)
TOP_PAD = 512 << 20  # grow the heap in large steps: fewer brk calls; untouched pages cost nothing
NO_TRIM = -1  # mallopt(3): "Setting M_TRIM_THRESHOLD to -1 disables trimming completely"

_applied: bool | None = None  # None until asked; then whether the settings took


def _wanted() -> bool:
    return os.environ.get("SELFFLOW_KEEP_FREED_MEMORY", "1") != "0"


def _mallopt():
    """glibc's ``mallopt`` or ``None`` (another C library, or no ``mallopt`` symbol)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None


def keep_freed_memory() -> bool:
    """Apply the settings once per process (later calls return the first answer). Returns whether they are on:
    ``False`` when ``SELFFLOW_KEEP_FREED_MEMORY=0``, off glibc, or when glibc refused a value."""
    global _applied
    if _applied is None:
        mallopt = _mallopt() if _wanted() else None
        _applied = mallopt is not None and all(
            mallopt(param, value) == 1  # mallopt returns 1 on success, 0 on error
            for param, value in ((M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX), (M_TRIM_THRESHOLD, NO_TRIM),
                                 (M_TOP_PAD, TOP_PAD)))
    return _applied


def host_malloc_summary() -> str:
    """For a CPU run's first log line: ``"malloc keeps freed memory"`` or ``"default malloc"``."""
    return "malloc keeps freed memory" if _applied else "default malloc"
