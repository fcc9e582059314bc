"""The identity "codec" of raw-waveform training: 1-D patches of the (low-rate) stereo waveform.

Audio tokens follow the design's layout: ids ``(t, 0, 0)`` with ``t`` the patch (frame) index — core
``patchify`` on a ``(B, C, N, 1, 1)`` view gives exactly that.
"""

from __future__ import annotations

import torch

from selfflow.core.tokens import Tokens, patchify, unpatchify


def frames_to_tokens(z: torch.Tensor, patch: int = 1) -> Tokens:
    """``(B, C, T)`` latent frames (or samples) → tokens ``(B, T/patch, C·patch)``, ids ``(t, 0, 0)``."""
    return patchify(z[..., None, None], (patch, 1, 1))


def tokens_to_frames(x: torch.Tensor, length: int, patch: int = 1) -> torch.Tensor:
    """Inverse of :func:`frames_to_tokens`: ``(B, L, C·patch)`` → ``(B, C, length)``."""
    return unpatchify(x, (length // patch, 1, 1), (patch, 1, 1))[..., 0, 0]


class WaveformCodec:
    """``(B, channels, num_samples)`` in [-1, 1] ↔ tokens of ``channels·patch`` values."""

    def __init__(self, num_samples: int, patch: int, channels: int = 2):
        if num_samples % patch:
            raise ValueError(f"num_samples {num_samples} is not divisible by patch {patch}")
        self.num_samples, self.patch, self.channels = num_samples, patch, channels

    @property
    def num_tokens(self) -> int:
        return self.num_samples // self.patch

    @property
    def token_channels(self) -> int:
        return self.channels * self.patch

    def to_tokens(self, wave: torch.Tensor) -> Tokens:
        return frames_to_tokens(wave, self.patch)

    def from_tokens(self, x: torch.Tensor) -> torch.Tensor:
        return tokens_to_frames(x, self.num_samples, self.patch)
