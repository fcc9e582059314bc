"""Clip sampling from real videos at the paper's setting (45 frames at 192p, Wan VAEs).

The Wan VAEs are causal in time: ``F = 4k + 1`` frames give ``k + 1`` latent frames and extra frames are
silently dropped by diffusers, so :class:`ClipSpec` insists on ``4k + 1``. Widths must be a multiple of 32
(Wan2.2's 16× spatial compression times a 2×2 DiT patch): 192×320 by default (12×20 latents).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .video_io import Backend, count_frames, read_frames, video_fps


class ClipSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    frames: int = Field(45, ge=1, description="4k+1 frames (Wan's causal VAE)")
    height: int = Field(192, ge=32, description="multiple of 32")
    width: int = Field(320, ge=32, description="multiple of 32")
    stride: int = Field(1, ge=1, description="take every stride-th source frame")
    fps: float | None = Field(None, gt=0, description="sample the clip at this frame rate whatever the source's "
                              "(None: every stride-th source frame)")

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

    @model_validator(mode="after")
    def _one_spacing(self) -> ClipSpec:
        if self.fps is not None and self.stride != 1:
            raise ValueError(f"give stride ({self.stride}) or fps ({self.fps:g}), not both: fps sets the spacing")
        return self

    def spacing(self, source_fps: float | None) -> float:
        """Source frames between two clip frames: ``stride``, or ``source_fps / fps`` (fractional: rounded
        per frame, so a 30 fps source read at 8 fps takes frames 0, 4, 8, 11, 15 …)."""
        if self.fps is None:
            return float(self.stride)
        if not source_fps or source_fps <= 0:
            raise ValueError(f"the video has no frame rate to resample to fps={self.fps:g}: use stride instead")
        return source_fps / self.fps


class SampledClip(NamedTuple):
    pixels: torch.Tensor  # (3, F, H, W) in [-1, 1]
    repeated: int  # clip frames past the video's end: its last frame, repeated


def clip_indices(total: int, frames: int, stride: float, rng: np.random.Generator) -> list[int]:
    """A random window of ``frames`` indices ``stride`` apart (rounded) inside ``total`` frames; a short video
    starts at 0 and its indices run past the end (the reader clamps them: the last frame repeats)."""
    offsets = [round(i * stride) for i in range(frames)]
    span = offsets[-1] + 1
    start = int(rng.integers(0, total - span + 1)) if total >= span else 0
    return [start + o for o in offsets]


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
                ) -> SampledClip:
    """One clip ``(3, spec.frames, spec.height, spec.width)`` in [-1, 1] from a video file, and how many of its
    frames repeat the last one because the video is shorter than the clip."""
    total = count_frames(path, backend)
    if total == 0:
        raise ValueError(f"{path}: no decodable frame")
    idx = clip_indices(total, spec.frames, spec.spacing(video_fps(path, backend) if spec.fps else None), rng)
    pixels = resize_crop(read_frames(path, idx, backend), spec.height, spec.width)
    return SampledClip(pixels, sum(i >= total for i in idx))
