"""The identity "codec" of pixel-space video training: clips are their own latents, cut into
space-time patches (core patchify, so token ids are (t, h, w) of the patch grid)."""

from __future__ import annotations

import torch

from selfflow.core.tokens import Tokens, patchify, unpatchify


class VideoPixelCodec:
    """``(B, 3, T, H, W)`` in [-1, 1] ↔ tokens of ``3·pt·ph·pw`` channels on a ``(T/pt, H/ph, W/pw)`` grid."""

    def __init__(self, frames: int, size: int, patch: tuple[int, int, int], channels: int = 3):
        pt, ph, pw = patch
        if frames % pt or size % ph or size % pw:
            raise ValueError(f"clip (frames, size) = ({frames}, {size}) is not divisible by the patch {patch}")
        self.frames, self.size, self.patch, self.channels = frames, size, tuple(patch), channels

    @property
    def grid(self) -> tuple[int, int, int]:
        pt, ph, pw = self.patch
        return (self.frames // pt, self.size // ph, self.size // pw)

    @property
    def token_channels(self) -> int:
        pt, ph, pw = self.patch
        return self.channels * pt * ph * pw

    def to_tokens(self, video: torch.Tensor) -> Tokens:
        return patchify(video, self.patch)

    def from_tokens(self, x: torch.Tensor) -> torch.Tensor:
        return unpatchify(x, self.grid, self.patch)
