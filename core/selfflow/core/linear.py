"""``nn.Linear`` whose fp32 CPU products run through oneDNN's matmul.

PyTorch runs an fp32 CPU ``F.linear`` as MKL's ``addmm`` against the transposed weight. On the CPU this
was measured on (an AVX2 AMD EPYC, 2 threads; docs/BENCHMARKS.md), oneDNN's matmul primitive runs the same
forward product at SiT-XL/2's shapes 1.1–1.4× faster alone and up to 1.15× inside a training step, and the
few-row products of distinct-level modulation — the adaLN Linear applied to the ``B·K`` levels instead of every
token, bound by reading the weight — 2× faster forward and 1.5–1.9× backward. MKL stays faster for the
backward of many rows, so that part keeps autograd's ``mm``.

Anything else — other devices, other dtypes, autocast, ``torch.compile`` (Inductor picks its own kernels),
an active dispatch mode (PyTorch's FLOP counter), tensor subclasses, tiny products whose fixed call cost
outweighs the gain, a PyTorch built without oneDNN — goes to ``F.linear`` unchanged. The parameters and
``state_dict`` keys are ``nn.Linear``'s, so checkpoints and the official key layout do not notice.
It is on by default on x86-64; ``SELFFLOW_ONEDNN_LINEAR=0`` turns it off, ``=1`` on elsewhere, and
:func:`onednn_linear` switches it inside a block.
"""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

MIN_WORK = 1 << 20  # M·K·N below which oneDNN's per-call cost outweighs its gain (64³ runs 3× slower)
FEW_ROWS = 16  # at most this many rows, the backward's products also run through oneDNN (faster up to ~16)


def _onednn_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


def _enabled_by_default() -> bool:
    """``SELFFLOW_ONEDNN_LINEAR`` when set; else on for x86-64, where PyTorch's fp32 CPU BLAS is MKL and the
    measurements above were made. Elsewhere (e.g. Apple silicon) nobody has timed it, so it waits to be asked."""
    setting = os.environ.get("SELFFLOW_ONEDNN_LINEAR")
    wanted = setting != "0" if setting is not None else platform.machine().lower() in ("x86_64", "amd64")
    return wanted and _onednn_available()


_ENABLED = _enabled_by_default()


@contextlib.contextmanager
def onednn_linear(enabled: bool) -> Iterator[None]:
    """Turn the oneDNN path on or off inside the block (benchmarks and tests compare both)."""
    global _ENABLED
    before = _ENABLED
    _ENABLED = enabled and _onednn_available()
    try:
        yield
    finally:
        _ENABLED = before


def cpu_kernels() -> str:
    """What the fp32 CPU Linear products run on now, for a run's first log line: ``"oneDNN"`` or ``"F.linear"``."""
    return "oneDNN" if _ENABLED else "F.linear"


def _matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x (M, K) @ weight (N, K).T + bias`` through oneDNN; strided operands are taken as they are."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _takes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return (_ENABLED and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and type(x) is torch.Tensor and type(weight) in (torch.Tensor, nn.Parameter)
            and (bias is None or (type(bias) in (torch.Tensor, nn.Parameter) and bias.dtype == torch.float32))
            and x.numel() * weight.shape[0] >= MIN_WORK
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
            and not is_in_torch_dispatch_mode())


class _OneDNNLinear(torch.autograd.Function):
    """Forward through oneDNN; backward through oneDNN for few rows, else ``mm`` as autograd's own."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _matmul(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()  # (M, N)
        few = grad.shape[0] <= FEW_ROWS
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _matmul(grad, weight.t(), None) if few else grad.mm(weight)  # (M, K)
        if ctx.needs_input_grad[1]:
            grad_w = _matmul(grad.t(), x.t(), None) if few else grad.t().mm(x)  # (N, K), the weight's layout
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(0)
        return grad_x, grad_w, grad_b


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with fp32 CPU products through oneDNN (see the module docstring for when)."""
    if not _takes(x, weight, bias):
        return F.linear(x, weight, bias)
    x2 = x.reshape(-1, x.shape[-1])  # (M, K)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        out = _OneDNNLinear.apply(x2, weight, bias)
    else:
        out = _matmul(x2, weight, bias)
    return out.view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same keys) that calls :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
