"""Clip sampling from real videos at the paper's setting (45 frames at 192p, Wan VAEs).

The Wan VAEs are causal in time: ``F = 4k + 1`` frames give ``k + 1`` latent frames and extra frames are
silently dropped by diffusers, so :class:`ClipSpec` insists on ``4k + 1``. Widths must be a multiple of 32
(Wan2.2's 16× spatial compression times a 2×2 DiT patch): 192×320 by default (12×20 latents).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .video_io import Backend, count_frames, read_frames


class ClipSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    frames: int = Field(45, ge=1, description="4k+1 frames (Wan's causal VAE)")
    height: int = Field(192, ge=32, description="multiple of 32")
    width: int = Field(320, ge=32, description="multiple of 32")
    stride: int = Field(1, ge=1, description="take every stride-th source frame")

    @field_validator("frames")
    @classmethod
    def _four_k_plus_one(cls, v: int) -> int:
        if (v - 1) % 4:
            raise ValueError(f"frames must be 4k+1 for the Wan VAEs (e.g. 45, 49), got {v}")
        return v

    @field_validator("height", "width")
    @classmethod
    def _multiple_of_32(cls, v: int) -> int:
        if v % 32:
            raise ValueError(f"height and width must be multiples of 32, got {v}")
        return v


def clip_indices(total: int, frames: int, stride: int, rng: np.random.Generator) -> list[int]:
    """A random window of ``frames`` indices ``stride`` apart inside ``total`` frames; a short video
    starts at 0 and its indices run past the end (the reader clamps them: the last frame repeats)."""
    span = (frames - 1) * stride + 1
    start = int(rng.integers(0, total - span + 1)) if total >= span else 0
    return [start + i * stride for i in range(frames)]


def resize_crop(frames: np.ndarray, height: int, width: int) -> torch.Tensor:
    """RGB uint8 ``(T, H, W, 3)`` → ``(3, T, height, width)`` float in [-1, 1]: scale so the frame covers
    the target (antialiased bilinear), then centre-crop."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1  # (T, 3, H, W)
    h, w = x.shape[-2:]
    scale = max(height / h, width / w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - height) // 2, (nw - width) // 2
    return x[:, :, top:top + height, left:left + width].clamp(-1, 1).permute(1, 0, 2, 3).contiguous()


def sample_clip(path: str | Path, spec: ClipSpec, rng: np.random.Generator, backend: Backend = "auto"
                ) -> torch.Tensor:
    """One clip ``(3, spec.frames, spec.height, spec.width)`` in [-1, 1] from a video file."""
    total = count_frames(path, backend)
    if total == 0:
        raise ValueError(f"{path}: no decodable frame")
    idx = clip_indices(total, spec.frames, spec.stride, rng)
    return resize_crop(read_frames(path, idx, backend), spec.height, spec.width)
