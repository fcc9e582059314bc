"""Attention kernels behind one function, with the backend chosen once per process.

``sdpa`` (PyTorch scaled_dot_product_attention: flash / memory-efficient / math as available) is the
default everywhere; ``xformers`` is used only when asked for *and* installed *and* on CUDA, since it has no
CPU kernels. ``math`` is the explicit reference used by tests.
"""

from __future__ import annotations

import importlib.util
import math

import torch
import torch.nn.functional as F
from einops import rearrange

BACKENDS = ("auto", "sdpa", "xformers", "math")


def resolve_backend(requested: str, device: torch.device | str) -> str:
    """Pick the attention backend actually used for ``requested`` on ``device``."""
    if requested not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {requested!r}")
    on_cuda = torch.device(device).type == "cuda"
    has_xformers = importlib.util.find_spec("xformers") is not None
    if requested == "xformers":
        if not (on_cuda and has_xformers):
            raise ValueError("attention backend 'xformers' needs the xformers package and a CUDA device "
                             f"(installed: {has_xformers}, device: {device}); use 'sdpa' or 'auto'")
        return "xformers"
    if requested == "auto":
        return "sdpa"
    return requested


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              backend: str = "sdpa") -> torch.Tensor:
    """``q, k, v (B, H, L, D)`` → ``(B, L, H·D)``. ``mask (B, 1, L, L)`` bool: True = attend."""
    if backend == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    elif backend == "math":
        scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.shape[-1])
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        out = (scores.softmax(-1) @ v.float()).type_as(q)
    elif backend == "xformers":  # pragma: no cover - CUDA only
        import xformers.ops as xops

        bias = None
        if mask is not None:
            bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
            bias = bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        out = xops.memory_efficient_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias).transpose(1, 2)
    else:
        raise ValueError(f"unknown attention backend {backend!r}")
    return rearrange(out, "b h l d -> b l (h d)")
