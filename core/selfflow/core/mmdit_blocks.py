"""The blocks of the FLUX.2-style :class:`~.mmdit.MMDiT`: double-stream (data and context streams with
their own weights, one joint attention) and single-stream (one sequence, attention ∥ MLP), the shared
adaLN modulation and the per-modality output layer. QK RMSNorm, SwiGLU MLPs, bias-free linears."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn
from torch.nn import functional as F

from .attention import attention
from .linear import Linear
from .modulation import gate_levels, modulate, modulate_levels
from .rope import apply_rope


class QKNorm(nn.Module):
    """RMSNorm of queries and keys per head (learned scale), for stable attention logits."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.query_norm = nn.RMSNorm(head_dim, eps=1e-6)
        self.key_norm = nn.RMSNorm(head_dim, eps=1e-6)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _fp32_rms_norm(self.query_norm, q), _fp32_rms_norm(self.key_norm, k)


def _fp32_rms_norm(norm: nn.RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` in fp32, as FLUX.2's RMSNorm, back in ``x``'s dtype. The scale is read in fp32 too: under bf16
    autocast a bf16 input, and under FSDP2's bf16 parameters a bf16 scale, would miss PyTorch's fused kernel."""
    return F.rms_norm(x.float(), norm.normalized_shape, norm.weight.float(), norm.eps).to(x.dtype)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w_in = Linear(dim, 2 * hidden, bias=False)
        self.w_out = Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w_in(x).chunk(2, dim=-1)
        return self.w_out(nn.functional.silu(a) * b)


def split_heads(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """Fused ``qkv (B, L, 3·H·Dh)`` → ``(3, B, H, L, Dh)``."""
    return rearrange(qkv, "b l (three h d) -> three b h l d", three=3, h=heads)


class StreamAttention(nn.Module):
    """The per-stream half of joint attention: qkv projection with QK norm, and the output projection."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = Linear(dim, 3 * dim, bias=False)
        self.norm = QKNorm(dim // heads)
        self.proj = Linear(dim, dim, bias=False)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = split_heads(self.qkv(x), self.heads)  # 3 × (B, H, L, Dh)
        q, k = self.norm(q, k)
        return q, k, v


class DoubleStreamBlock(nn.Module):
    """Separate weights for the data and context streams, one attention over both."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int, has_context: bool):
        super().__init__()
        self.img_norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.img_attn = StreamAttention(dim, heads)
        self.img_norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.img_mlp = SwiGLU(dim, mlp_hidden)
        self.has_context = has_context
        if has_context:
            self.txt_norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.txt_attn = StreamAttention(dim, heads)
            self.txt_norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.txt_mlp = SwiGLU(dim, mlp_hidden)

    def forward(self, img: torch.Tensor, txt: torch.Tensor | None, img_mod: list[torch.Tensor],
                index: torch.Tensor | None, txt_mod: list[torch.Tensor] | None,
                rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
                backend: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        # img_mod: six (B, K, D) per-level vectors, each data token takes its level's (index (B, L)) in here;
        # txt_mod: six (B, 1, D) for the context tokens.
        shift1, scale1, gate1, shift2, scale2, gate2 = img_mod
        q, k, v = self.img_attn.qkv_heads(modulate_levels(self.img_norm1(img), shift1, scale1, index))
        n_txt = 0
        if txt is not None:
            t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = txt_mod
            tq, tk, tv = self.txt_attn.qkv_heads(modulate(self.txt_norm1(txt), t_shift1, t_scale1))
            q, k, v = torch.cat([tq, q], 2), torch.cat([tk, k], 2), torch.cat([tv, v], 2)
            n_txt = txt.shape[1]
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = attention(q, k, v, mask, backend)
        txt_out, img_out = out[:, :n_txt], out[:, n_txt:]
        img = gate_levels(img, gate1, self.img_attn.proj(img_out), index)
        img = gate_levels(img, gate2, self.img_mlp(modulate_levels(self.img_norm2(img), shift2, scale2, index)), index)
        if txt is not None:
            txt = txt + t_gate1 * self.txt_attn.proj(txt_out)
            txt = txt + t_gate2 * self.txt_mlp(modulate(self.txt_norm2(txt), t_shift2, t_scale2))
        return img, txt


class SingleStreamBlock(nn.Module):
    """One set of weights over the concatenated ``[context; data]`` sequence; attention ∥ MLP."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int):
        super().__init__()
        self.heads, self.dim, self.mlp_hidden = heads, dim, mlp_hidden
        self.pre_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear1 = Linear(dim, 3 * dim + 2 * mlp_hidden, bias=False)
        self.norm = QKNorm(dim // heads)
        self.linear2 = Linear(dim + mlp_hidden, dim, bias=False)

    def forward(self, x: torch.Tensor, mod: list[torch.Tensor], index: torch.Tensor | None,
                rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None, backend: str) -> torch.Tensor:
        shift, scale, gate = mod  # 3 × (B, K, D), each token of [context; data] its level's (index (B, Lc + L))
        qkv, mlp_in = self.linear1(modulate_levels(self.pre_norm(x), shift, scale, index)).split(
            [3 * self.dim, 2 * self.mlp_hidden], dim=-1)
        q, k, v = split_heads(qkv, self.heads)  # 3 × (B, H, L, Dh)
        q, k = self.norm(q, k)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        a, g = mlp_in.chunk(2, dim=-1)
        out = torch.cat([attention(q, k, v, mask, backend), nn.functional.silu(a) * g], dim=-1)
        return gate_levels(x, gate, self.linear2(out), index)


class Modulation(nn.Module):
    """``n`` (shift, scale, gate) triples from the conditioning vector, shared by every block."""

    def __init__(self, dim: int, n: int):
        super().__init__()
        self.lin = Linear(dim, 3 * n * dim, bias=False)

    def forward(self, vec: torch.Tensor) -> torch.Tensor:
        return self.lin(nn.functional.silu(vec))  # (B, K, 3·n·D)


class FinalLayer(nn.Module):
    """Per-modality output head: adaLN (shift, scale) from the conditioning, then a Linear to the channels."""

    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(dim, 2 * dim, bias=False))
        self.linear = Linear(dim, out_channels, bias=False)

    def forward(self, x: torch.Tensor, vec: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=-1)  # 2 × (B, K, D)
        return self.linear(modulate_levels(self.norm(x), shift, scale, index))
