"""Analytic FLOPs of the MMDiT, for tokens/s → MFU accounting (matmuls only; norms and elementwise
ops are a few percent and left out, as is customary)."""

from __future__ import annotations

from .mmdit import MMDiTConfig


def mmdit_forward_flops(cfg: MMDiTConfig, n_data: int, n_context: int = 0, upto: int | None = None,
                        token_channels: int = 0) -> float:
    """FLOPs of one sample's forward through blocks ``1 … upto`` (all blocks and the heads if None)."""
    d, h = cfg.hidden_size, cfg.mlp_hidden
    n_context += int(cfg.class_token)  # the label's context token
    n = n_data + n_context
    stream = 3 * d * d + d * d + 2 * h * d + h * d  # qkv, proj, SwiGLU in + out
    single = d * (3 * d + 2 * h) + (d + h) * d
    attn = 2 * 2 * n * n * d  # QKᵀ and AV
    total = 2.0 * token_channels * d * n_data  # input projection
    blocks = cfg.depth if upto is None else upto
    for b in range(1, blocks + 1):
        if b <= cfg.depth_double:
            total += 2 * stream * n_data + 2 * stream * n_context + attn
        else:
            total += 2 * single * n + attn
    if upto is None:
        total += 2.0 * d * token_channels * n_data + 2.0 * d * 2 * d  # output head + its modulation
    return total


def train_step_flops(model, n_data: int, n_context: int = 0, teacher_layer: int | None = None) -> float:
    """Per sample: student forward + backward (3× forward) plus the teacher's forward to its layer, for
    any backbone with ``forward_flops`` (see :mod:`.backbones`)."""
    student = 3 * model.forward_flops(n_data, n_context)
    teacher = model.forward_flops(n_data, n_context, upto=teacher_layer) if teacher_layer else 0.0
    return student + teacher


def dit_forward_flops(cfg, n_data: int, upto: int | None = None, token_channels: int = 0) -> float:
    """FLOPs of one sample's DiT forward through blocks ``1 … upto`` (all and the head if None), with the
    adaLN computed once per sample (one distinct level), as :class:`~selfflow.core.dit.DiT` does."""
    d, h, n = cfg.hidden_size, cfg.mlp_hidden, n_data
    per_block = 2 * n * (4 * d * d + 2 * d * h) + 2 * 2 * n * n * d + 2 * 6 * d * d
    total = 2.0 * token_channels * d * n + 2.0 * (256 * d + d * d)  # patch embed, timestep MLP
    total += per_block * (cfg.depth if upto is None else upto)
    if upto is None:
        out = token_channels * (2 if cfg.learn_sigma else 1)
        total += 2.0 * d * out * n + 2.0 * d * 2 * d
    return total
