"""Video samples: a batch as one tiled clip (MP4 (H.264) plus a GIF preview, captions beside them), or one clip
exactly, as the uint8 frames an evaluator reads."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from .video_io import write_gif, write_mp4


def to_uint8_frames(videos: torch.Tensor) -> torch.Tensor:
    """``(..., 3, T, H, W)`` in [-1, 1] → RGB uint8 ``(..., T, H, W, 3)`` on the CPU."""
    x = ((videos.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    return x.movedim(-4, -1)


def tile_clips(videos: torch.Tensor, columns: int | None = None, scale: int = 2, pad: int = 2) -> np.ndarray:
    """``(B, 3, T, H, W)`` in [-1, 1] → RGB uint8 ``(T, rows·(H·scale+pad)+pad, cols·(W·scale+pad)+pad, 3)``
    on a white background, sample ``i`` at row ``i // cols``, column ``i % cols`` (even sizes for MP4)."""
    b, _, t, h, w = videos.shape
    cols = max(1, min(columns or math.ceil(math.sqrt(b)), b))
    rows = math.ceil(b / cols)
    x = to_uint8_frames(videos).repeat_interleave(scale, -3).repeat_interleave(scale, -2).numpy()
    th, tw = h * scale + pad, w * scale + pad
    height, width = rows * th + pad, cols * tw + pad
    canvas = np.full((t, height + height % 2, width + width % 2, 3), 255, dtype=np.uint8)
    for i in range(b):
        r, c = divmod(i, cols)
        canvas[:, pad + r * th:pad + r * th + h * scale, pad + c * tw:pad + c * tw + w * scale] = x[i]
    return canvas


def save_video_samples(videos: torch.Tensor, path: str | Path, captions: list[str] | None = None,
                       fps: int = 8) -> Path:
    """Write ``path.mp4``, ``path.gif`` and (with captions) ``path.txt``; returns the MP4 path."""
    path = Path(path)
    frames = tile_clips(videos)
    mp4 = write_mp4(frames, path.with_suffix(".mp4"), fps)
    write_gif(frames, path.with_suffix(".gif"), fps)
    if captions:
        path.with_suffix(".txt").write_text("".join(f"{i}: {c}\n" for i, c in enumerate(captions)))
    return mp4


def save_clip_frames(video: torch.Tensor, path: str | Path) -> Path:
    """One clip ``(3, T, H, W)`` in [-1, 1] → ``path.npy``, uint8 ``(T, H, W, 3)``, written atomically.

    What ``selfflow eval fvd`` reads from ``selfflow sample --out-dir``: the generated frames exactly — no
    tiling, upscaling, border or lossy codec between the sampler and I3D (H.264 at crf 18 would move FVD).
    """
    path = Path(path).with_suffix(".npy")
    tmp = path.with_name(path.stem + ".tmp.npy")
    np.save(tmp, to_uint8_frames(video).numpy())
    tmp.replace(path)
    return path
