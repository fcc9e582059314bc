"""Token layout shared by every modality.

A modality turns a batch of latents into :class:`Tokens`: ``x (B, L, C)`` latent patches and
``ids (B, L, 3)`` integer ``(t, h, w)`` positions for the 3D RoPE. Grid latents (images ``T = 1``,
videos) share :func:`patchify` / :func:`unpatchify`; other layouts (audio) build their own ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict


@dataclass
class Tokens:
    """``x (B, L, C)`` token features and ``ids (B, L, 3)`` integer (t, h, w) positions; ``target (B, L, D)``
    optionally holds per-token features of an external frozen encoder (the REPA objective's target)."""

    x: torch.Tensor
    ids: torch.Tensor
    target: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.x.ndim != 3 or self.ids.ndim != 3 or self.ids.shape[-1] != 3:
            raise ValueError(f"Tokens need x (B, L, C) and ids (B, L, 3); got {tuple(self.x.shape)} "
                             f"and {tuple(self.ids.shape)}")
        if self.x.shape[:2] != self.ids.shape[:2]:
            raise ValueError(f"x {tuple(self.x.shape)} and ids {tuple(self.ids.shape)} disagree on (B, L)")
        if self.target is not None and self.target.shape[:2] != self.x.shape[:2]:
            raise ValueError(f"target {tuple(self.target.shape)} and x {tuple(self.x.shape)} disagree on (B, L)")


class Conditioning(BaseModel):
    """What a sample is conditioned on: class ``labels (B,)``, text ``context (B, Lc, Dc)`` with an
    optional ``context_mask (B, Lc)`` (True = real token), or nothing."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    labels: torch.Tensor | None = None
    context: torch.Tensor | None = None
    context_mask: torch.Tensor | None = None


def grid_ids(t: int, h: int, w: int, batch: int = 1, device: torch.device | str = "cpu") -> torch.Tensor:
    """Row-major ``(t, h, w)`` positions of a token grid, ``(batch, t*h*w, 3)`` int64."""
    tt, hh, ww = torch.meshgrid(
        torch.arange(t, device=device), torch.arange(h, device=device),
        torch.arange(w, device=device), indexing="ij")
    ids = torch.stack([tt, hh, ww], dim=-1).reshape(1, t * h * w, 3)
    return ids.expand(batch, -1, -1)


def patchify(latent: torch.Tensor, patch: tuple[int, int, int]) -> Tokens:
    """``(B, C, T, H, W)`` latent → tokens of ``C·pt·ph·pw`` channels ordered ``(c, pt, ph, pw)``.

    Tokens run row-major over the ``(T/pt, H/ph, W/pw)`` grid — the official Self-Flow layout for images
    (``pt = 1``), so its checkpoints' patch embeddings apply unchanged.
    """
    b, c, t, h, w = latent.shape
    pt, ph, pw = patch
    if t % pt or h % ph or w % pw:
        raise ValueError(f"latent (T, H, W) = {(t, h, w)} is not divisible by the patch size {patch}")
    x = latent.reshape(b, c, t // pt, pt, h // ph, ph, w // pw, pw)
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, (t // pt) * (h // ph) * (w // pw), c * pt * ph * pw)
    return Tokens(x=x, ids=grid_ids(t // pt, h // ph, w // pw, b, latent.device))


def unpatchify(x: torch.Tensor, grid: tuple[int, int, int], patch: tuple[int, int, int]) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``(B, L, C·pt·ph·pw)`` → ``(B, C, T, H, W)``."""
    b, length, ch = x.shape
    gt, gh, gw = grid
    pt, ph, pw = patch
    if length != gt * gh * gw or ch % (pt * ph * pw):
        raise ValueError(f"cannot unpatchify {tuple(x.shape)} to grid {grid} with patch {patch}")
    c = ch // (pt * ph * pw)
    x = x.reshape(b, gt, gh, gw, c, pt, ph, pw).permute(0, 4, 1, 5, 2, 6, 3, 7)
    return x.reshape(b, c, gt * pt, gh * ph, gw * pw)
