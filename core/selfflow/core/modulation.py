"""Per-token timestep conditioning computed on the *distinct* timesteps only.

Under Dual-Timestep Scheduling a sample's tokens carry at most two noise levels (one at inference).
Anything that depends on ``t`` alone — the timestep embedding and the adaLN modulation vectors — is
computed once per distinct value and gathered to the tokens: the same numbers as a per-token Linear,
without its cost. :class:`TokenTimesteps` holds that factorisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

TIME_EMBED_DIM = 256  # width of the sinusoidal timestep embedding fed to the backbones' time MLPs


@dataclass
class TokenTimesteps:
    """Per-token timesteps as ``values (B, K)`` distinct levels and ``index (B, L)`` into them.

    ``index is None`` means every token of a sample uses ``values[:, 0]`` (``K == 1``), which lets the
    modulation broadcast ``(B, 1, D)`` instead of materialising ``(B, L, D)``.
    """

    values: torch.Tensor
    index: torch.Tensor | None
    length: int

    @classmethod
    def scalar(cls, t: torch.Tensor, length: int) -> TokenTimesteps:
        """One timestep per sample, ``t (B,)``."""
        return cls(values=t.reshape(-1, 1), index=None, length=length)

    @classmethod
    def from_levels(cls, values: torch.Tensor, index: torch.Tensor) -> TokenTimesteps:
        """Known levels ``values (B, K)`` and ``index (B, L)`` — no search, no device sync."""
        return cls(values=values, index=index, length=index.shape[1])

    @classmethod
    def from_dense(cls, t: torch.Tensor) -> TokenTimesteps:
        """Factorise arbitrary per-token timesteps ``t (B, L)`` (one device sync to size ``K``)."""
        sorted_t, order = t.sort(dim=1)
        is_new = torch.ones_like(sorted_t, dtype=torch.bool)
        is_new[:, 1:] = sorted_t[:, 1:] != sorted_t[:, :-1]
        rank = is_new.long().cumsum(1) - 1  # (B, L): level of each sorted token
        k = int(rank[:, -1].max()) + 1
        if k == 1:
            return cls.scalar(t[:, 0], t.shape[1])
        index = torch.empty_like(rank).scatter_(1, order, rank)
        # Samples with fewer than K levels keep their last value as padding (never gathered).
        values = sorted_t[:, -1:].expand(-1, k).clone().scatter_(1, rank, sorted_t)
        return cls(values=values, index=index, length=t.shape[1])

    @classmethod
    def coerce(cls, t: torch.Tensor | TokenTimesteps, batch: int, length: int) -> TokenTimesteps:
        """Accept ``(B,)``, ``(B, L)`` or an already factorised :class:`TokenTimesteps`."""
        if isinstance(t, TokenTimesteps):
            tt = t
        elif t.ndim == 1:
            tt = cls.scalar(t, length)
        elif t.ndim == 2:
            tt = cls.from_dense(t)
        else:
            raise ValueError(f"timesteps must be (B,) or (B, L); got shape {tuple(t.shape)}")
        if tt.values.shape[0] != batch or tt.length != length:
            raise ValueError(f"timesteps cover (B={tt.values.shape[0]}, L={tt.length}) but the tokens "
                             f"are (B={batch}, L={length})")
        return tt

    def dense(self) -> torch.Tensor:
        """The per-token timesteps ``(B, L)``."""
        if self.index is None:
            return self.values[:, :1].expand(-1, self.length)
        return self.values.gather(1, self.index)

    def counts(self) -> torch.Tensor:
        """How many tokens of each sample use each level, ``(B, K)``."""
        if self.index is None:
            return torch.full_like(self.values, float(self.length))
        return torch.zeros_like(self.values).scatter_add_(
            1, self.index, torch.ones_like(self.index, dtype=self.values.dtype))


def select_levels(per_level: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``(B, K, D)`` per-level vectors → ``(B, L, D)``, each token its level's (no autograd of its own)."""
    if per_level.shape[1] == 2:  # Dual-Timestep Scheduling: a select, exact (no arithmetic touches the values)
        return torch.where(index.bool().unsqueeze(-1), per_level[:, 1:2], per_level[:, :1])
    return per_level.gather(1, index.unsqueeze(-1).expand(-1, -1, per_level.shape[-1]))


def reduce_levels(grad: torch.Tensor, index: torch.Tensor, levels: int) -> torch.Tensor:
    """The backward of :func:`select_levels`: ``(B, L, D)`` token gradients summed per level, ``(B, K, D)``.

    Two levels are summed in one of two ways:

    - eager: one batched matrix product ``(B, 2, L) · (B, L, D)``. Autograd's own backward of a broadcasting
      select writes two masked ``(B, L, D)`` copies of the gradient and reduces each (forward + backward at
      SiT-XL/2 size on the CPU: ~7 ms with it, ~3 ms with this).
    - inside ``torch.compile``: two sums over ``L`` of the gradient times a 0/1 float mask and one minus it. A
      matrix product is a kernel of its own, so the per-token gradient would be written out for it to read;
      sums let Inductor fold the reduction into the kernel that makes the gradient, as it does for flow
      matching's one level. SiT-XL/2 on an H200 (batch 64, bf16): 4.7 ms a step for these sums, 6.5 ms when
      written with ``torch.where`` (docs/BENCHMARKS.md "Third run").

    More levels (dense per-token timesteps; the MMDiT's context level) are a scatter-add, as ``gather``'s backward.
    """
    if levels == 2:
        second = index.bool()
        if torch.compiler.is_compiling():
            w = second.unsqueeze(-1).to(grad.dtype)  # (B, L, 1): 1 for level 1; products with 0/1 are exact
            return torch.stack([(grad * (1 - w)).sum(1), (grad * w).sum(1)], 1)
        one_hot = torch.stack([~second, second], dim=1).to(grad.dtype)  # (B, 2, L)
        return torch.bmm(one_hot, grad)
    out = grad.new_zeros(grad.shape[0], levels, grad.shape[-1])
    return out.scatter_add_(1, index.unsqueeze(-1).expand_as(grad), grad)


class _ModulateLevels(torch.autograd.Function):
    """adaLN ``x · (1 + scale) + shift`` with each token's level of ``shift, scale (B, K, D)``.

    The same numbers as :func:`modulate` on the selected ``(B, L, D)`` vectors, forward and backward (each
    gradient is rounded to its input's dtype where autograd would round it), but it keeps only ``x`` and the
    levels for the backward: autograd of the plain expression would keep ``1 + scale`` per token, one
    ``(B, L, D)`` a modulation, which the backward's select makes again for less.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, scale, index)
        product = x * select_levels(1 + scale, index)  # 1 + scale on the K levels, not on every token
        ctx.dtypes = product.dtype, shift.dtype  # autograd rounds each gradient so before it goes further back
        return product + select_levels(shift, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, scale, index = ctx.saved_tensors
        levels = scale.shape[1]
        product_dtype, shift_dtype = ctx.dtypes
        grad_product = grad.to(product_dtype)
        grad_x = grad_shift = grad_scale = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_product * select_levels(1 + scale, index)
        if ctx.needs_input_grad[1]:
            grad_shift = reduce_levels(grad.to(shift_dtype), index, levels)
        if ctx.needs_input_grad[2]:
            grad_scale = reduce_levels((grad_product * x).to(scale.dtype), index, levels)
        return grad_x, grad_shift, grad_scale, None


class _GateLevels(torch.autograd.Function):
    """The gated residual ``h + gate · out`` with each token's level of ``gate (B, K, D)``; keeps ``out`` and the
    levels for the backward, not the per-token gate (see :class:`_ModulateLevels`)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, gate: torch.Tensor, out: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, out, index)
        product = select_levels(gate, index) * out
        ctx.product_dtype = product.dtype
        return h + product

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        gate, out, index = ctx.saved_tensors
        grad_product = grad.to(ctx.product_dtype)  # autograd rounds it so for the product's backward
        grad_h = grad if ctx.needs_input_grad[0] else None
        grad_gate = grad_out = None
        if ctx.needs_input_grad[1]:
            grad_gate = reduce_levels(grad_product * out, index, gate.shape[1])
        if ctx.needs_input_grad[2]:
            grad_out = grad_product * select_levels(gate, index)
        return grad_h, grad_gate, grad_out, None


def modulate_levels(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                    index: torch.Tensor | None) -> torch.Tensor:
    """:func:`modulate` of ``x (B, L, D)`` by per-level ``shift, scale (B, K, D)``, each token its level's
    (``index is None``: every token level 0, broadcast)."""
    if index is None:
        return modulate(x, shift[:, :1], scale[:, :1])
    return _ModulateLevels.apply(x, shift, scale, index)


def gate_levels(h: torch.Tensor, gate: torch.Tensor, out: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """adaLN-Zero's gated residual ``h + gate · out`` with per-level ``gate (B, K, D)``."""
    if index is None:
        return h + gate[:, :1] * out
    return _GateLevels.apply(h, gate, out, index)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: ``x · (1 + scale) + shift`` (zero modulation is the identity)."""
    return x * (1 + scale) + shift


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0,
                       time_factor: float = 1000.0) -> torch.Tensor:
    """Sinusoidal embedding ``(..., dim)`` of ``t (...)`` in [0, 1] (scaled by ``time_factor``, as FLUX)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.float() * time_factor)[..., None] * freqs
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[..., :1])], dim=-1)
    return emb
