"""bf16 autocast (``precision: bf16``) and whether this machine's CPU multiplies bf16 matrices natively.

On the GPU bf16 autocast is the paper's recipe. On the CPU its speed depends on the instruction set: with
AVX512-BF16 (or AMX-BF16) a bf16 matrix product ran at 2.8× the fp32 rate and the SiT-XL/2 Self-Flow step 1.5×
faster (docs/BENCHMARKS.md "bf16 on the CPU"); without them PyTorch falls back to a path measured ~100× slower
than fp32 (0.9 vs 107 GFLOP/s). So fp32 stays the CPU default, and asking for bf16 on a CPU without those
instructions warns.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch

SLOW_CPU_BF16 = ("bf16 on this CPU (no AVX512-BF16 or AMX-BF16 instructions) may be far slower than fp32 "
                 "(~100x measured on such a CPU); fp32 is the CPU default")


_said_slow = False  # SLOW_CPU_BF16 is said once per process: training, then its previews' sampler, would each say it


def cpu_bf16_is_native() -> bool:
    """Whether the CPU has AVX512-BF16 or AMX-BF16 instructions (x86); False where torch cannot tell."""
    capabilities = getattr(torch.cpu, "get_capabilities", None)  # newer torch; the flags below before it
    if capabilities is not None:
        flags = capabilities()
        return bool(flags.get("avx512_bf16") or flags.get("amx_bf16"))
    checks = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(check() for check in checks if check is not None)


def warn_if_slow(precision: str, device: torch.device | str, stacklevel: int = 2) -> None:
    """Warn, once per process, when ``precision`` is bf16 on a CPU without native bf16 matrix products
    (``stacklevel`` as :func:`warnings.warn`: 2 names the line that called this)."""
    global _said_slow
    if precision == "bf16" and torch.device(device).type == "cpu" and not cpu_bf16_is_native() and not _said_slow:
        _said_slow = True
        warnings.warn(SLOW_CPU_BF16, stacklevel=stacklevel)


@contextlib.contextmanager
def autocast(precision: str, device: torch.device | str) -> Iterator[None]:
    """``torch.autocast(bfloat16)`` on ``device`` for ``precision == "bf16"``, else nothing."""
    if precision == "fp32":
        yield
        return
    if precision != "bf16":
        raise ValueError(f"unknown precision {precision!r} (fp32, bf16)")
    warn_if_slow(precision, device, stacklevel=4)  # the caller of the ``with`` (contextmanager adds two frames)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        yield
