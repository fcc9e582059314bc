"""The identity "codec" of pixel-space training: images are their own latents, cut into patches."""

from __future__ import annotations

import torch

from selfflow.core.tokens import Tokens, patchify, unpatchify


class PixelCodec:
    """``(B, 3, H, W)`` in [-1, 1] ↔ tokens of ``3·p·p`` channels on an ``(H/p) × (W/p)`` grid."""

    def __init__(self, image_size: int, patch_size: int, channels: int = 3):
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
        self.image_size, self.patch_size, self.channels = image_size, patch_size, channels

    @property
    def grid(self) -> tuple[int, int, int]:
        g = self.image_size // self.patch_size
        return (1, g, g)

    @property
    def token_channels(self) -> int:
        return self.channels * self.patch_size**2

    def to_tokens(self, images: torch.Tensor) -> Tokens:
        return patchify(images.unsqueeze(2), (1, self.patch_size, self.patch_size))

    def from_tokens(self, x: torch.Tensor) -> torch.Tensor:
        return unpatchify(x, self.grid, (1, self.patch_size, self.patch_size)).squeeze(2)
