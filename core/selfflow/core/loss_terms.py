"""The objective's loss terms, in fp32: flow matching and representation alignment.

Each takes optional per-token weights ``(B, L)`` from a noise plan (:mod:`selfflow.core.noise_plan`) whose
weighted sum is the term; without weights a term is the plain mean, computed exactly as
``F.mse_loss`` / ``cosine_similarity(...).mean()`` so the plain path's numbers never move. The cast to fp32
before normalising avoids the bf16/fp16 NaNs users report for the cosine.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .backbone_protocol import captured
from .modulation import TokenTimesteps
from .tokens import Conditioning


def token_mse(pred: torch.Tensor, target: torch.Tensor, channels: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, L)`` squared error per token, averaged over its content ``channels (L, C)`` (None: all)."""
    sq = (pred.float() - target.float()).pow(2)  # (B, L, C)
    return sq.mean(-1) if channels is None else (sq * channels).sum(-1) / channels.sum(-1)


def flow_matching_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                       channels: torch.Tensor | None = None,
                       group_weight: dict[str, torch.Tensor] | None = None
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``MSE(v̂, ε − x0)`` of ``(B, L, C)`` tokens and the detached per-group terms ``{loss_fm_<group>: Σ w_g ·
    err}``; ``weight``: ``(B, L)``."""
    if pred.shape != target.shape:  # a broadcast would silently score every prediction against every target
        raise ValueError(f"the velocity prediction {tuple(pred.shape)} does not match its target "
                         f"{tuple(target.shape)}")
    if weight is not None and weight.shape != pred.shape[:2]:
        raise ValueError(f"per-token weights {tuple(weight.shape)} do not match the tokens {tuple(pred.shape[:2])}")
    if weight is None:
        return F.mse_loss(pred.float(), target.float()), {}
    err = token_mse(pred, target, channels)  # (B, L)
    groups = {f"loss_fm_{name}": (w * err).sum().detach() for name, w in (group_weight or {}).items()}
    return (weight * err).sum(), groups


def alignment_loss(feats: torch.Tensor, aligned_to: torch.Tensor, weight: torch.Tensor | None = None,
                   distance: str = "cosine") -> torch.Tensor:
    """``−cos(proj(h_l), target)`` per token ``(B, L, D)`` (``distance="l2"``: the squared difference meaned over
    channels), meaned over tokens (or summed with ``weight (B, L)``)."""
    if feats.shape != aligned_to.shape:
        raise ValueError(f"projected features {tuple(feats.shape)} do not match the alignment target "
                         f"{tuple(aligned_to.shape)}: set the projector's output width to the target's")
    if distance == "l2":
        err = token_mse(feats, aligned_to)  # (B, L)
        return err.mean() if weight is None else (weight * err).sum()
    if distance != "cosine":
        raise ValueError(f"alignment distance must be 'cosine' or 'l2', got {distance!r}")
    cos = F.cosine_similarity(feats.float(), aligned_to.float(), dim=-1)  # (B, L)
    return -cos.mean() if weight is None else -(weight * cos).sum()


def teacher_features(teacher: nn.Module, x: torch.Tensor, ids: torch.Tensor, t: torch.Tensor | TokenTimesteps,
                     cond: Conditioning, *, modality: str | None, layer: int) -> torch.Tensor:
    """The EMA teacher's block-``layer`` hidden states ``(B, L, D)``: no gradients, no block past ``layer``."""
    with torch.no_grad():
        _, feats = captured(teacher(x, ids, t, cond, modality=modality, capture=(layer,), stop_after=layer), (layer,))
    return feats[layer]
