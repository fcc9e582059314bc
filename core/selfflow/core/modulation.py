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


class _SelectOfTwo(torch.autograd.Function):
    """Each token takes level 0 or 1 of its sample: ``(B, 2, D)`` → ``(B, L, D)``.

    The forward is a select (exact: no arithmetic touches the values, so TF32 cannot round them). The backward
    sums each level's token gradients, in one of two ways:

    - eager: one batched matrix product ``(B, 2, L) · (B, L, D)``. Autograd's own backward of a broadcasting
      select writes two masked ``(B, L, D)`` copies of the gradient and reduces each (forward + backward at
      SiT-XL/2 size on the CPU: ~7 ms with it, ~3 ms with this).
    - inside ``torch.compile``: two sums over ``L`` of the gradient times a 0/1 float mask and one minus it. A
      matrix product is a kernel of its own, so the per-token gradient would be written out for it to read;
      sums let Inductor fold the reduction into the kernel that makes the gradient, as it does for flow
      matching's one level. SiT-XL/2 on an H200 (batch 64, bf16): 4.7 ms a step for these sums, 6.5 ms when
      written with ``torch.where`` (docs/BENCHMARKS.md "Third run").
    """

    @staticmethod
    def forward(ctx, per_level: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        second = index.bool()
        ctx.save_for_backward(second)
        return torch.where(second.unsqueeze(-1), per_level[:, 1:2], per_level[:, :1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (second,) = ctx.saved_tensors
        if torch.compiler.is_compiling():
            w = second.unsqueeze(-1).to(grad.dtype)  # (B, L, 1): 1 for level 1; products with 0/1 are exact
            return torch.stack([(grad * (1 - w)).sum(1), (grad * w).sum(1)], 1), None
        one_hot = torch.stack([~second, second], dim=1).to(grad.dtype)  # (B, 2, L)
        return torch.bmm(one_hot, grad), None


def gather_levels(per_level: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """``(B, K, D)`` per-level vectors → ``(B, L, D)`` per-token (or ``(B, 1, D)`` when ``index is None``)."""
    if index is None:
        return per_level[:, :1]
    if per_level.shape[1] == 2:  # Dual-Timestep Scheduling
        return _SelectOfTwo.apply(per_level, index)
    return per_level.gather(1, index.unsqueeze(-1).expand(-1, -1, per_level.shape[-1]))


def gather_chunks(per_level: torch.Tensor, index: torch.Tensor | None, chunks: int) -> tuple[torch.Tensor, ...]:
    """``(B, K, chunks·D)`` → ``chunks`` per-token tensors ``(B, L, D)``, e.g. an adaLN's shift, scale and gate.

    Splitting before the gather, not after, means no ``(B, L, chunks·D)`` gradient is ever assembled: each
    part's gradient is reduced to its levels on its own (compiled SiT-XL/2 Self-Flow on an H200 spent 6.5 ms a
    step writing that assembled gradient and 1.7 ms reducing it).
    """
    return tuple(gather_levels(part, index) for part in per_level.chunk(chunks, dim=-1))


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
