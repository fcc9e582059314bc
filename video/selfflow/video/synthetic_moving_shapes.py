"""A class-conditional, captioned toy video dataset: a coloured shape moving in one direction.

Each class is a (colour, shape, direction) triple and its caption says so ("a red square moving left").
Shapes and colours are drawn by the image package's synthetic-shapes renderer (same anti-aliased masks).
A clip depends only on ``(seed, index)``, like the image dataset: any rank can make any clip and a
stream's position is one integer.
"""

from __future__ import annotations

import numpy as np
import torch

from selfflow.core.data.shapes import COLOURS, shape_mask

DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
CLASSES: list[tuple[str, str, str]] = [
    ("red", "square", "left"), ("red", "circle", "right"), ("green", "triangle", "up"),
    ("green", "square", "down"), ("blue", "circle", "left"), ("blue", "cross", "right"),
    ("yellow", "diamond", "up"), ("magenta", "cross", "down"),
]
CAPTIONS = [f"a {c} {s} moving {d}" for c, s, d in CLASSES]


def render_clip(seed: int, index: int, frames: int = 8, size: int = 32) -> tuple[np.ndarray, int]:
    """Clip ``index`` of stream ``seed``: ``(3, frames, size, size)`` float32 in [-1, 1] and its label.

    The shape crosses between 50 % and 100 % of the free space over the clip, never leaving the frame.
    """
    rng = np.random.default_rng([seed, index])
    label = int(rng.integers(len(CLASSES)))
    colour, shape, direction = CLASSES[label]
    r = rng.uniform(0.15, 0.22) * size
    lo, hi = r + 1, size - r - 1
    dx, dy = DIRECTIONS[direction]
    travel = rng.uniform(0.5, 1.0) * (hi - lo)
    start = rng.uniform(lo, hi, size=2)
    axis, sign = (0, dx) if dx else (1, dy)  # the coordinate along the motion must leave room to travel
    start[axis] = rng.uniform(lo + travel, hi) if sign < 0 else rng.uniform(lo, hi - travel)
    rgb = np.clip(np.array(COLOURS[colour]) * rng.uniform(0.85, 1.1), 0, 1)
    background = rng.uniform(0.0, 0.12)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    out = np.empty((3, frames, size, size), dtype=np.float32)
    for f in range(frames):
        step = travel * f / max(1, frames - 1)
        alpha = shape_mask(shape, xx, yy, start[0] + dx * step, start[1] + dy * step, r)
        out[:, f] = (background * (1 - alpha) + alpha * rgb[:, None, None]) * 2 - 1
    return out, label


def render_batch(seed: int, indices: range | list[int], frames: int = 8, size: int = 32
                 ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Clips ``(B, 3, frames, size, size)``, labels ``(B,)`` and captions for the given indices."""
    pairs = [render_clip(seed, i, frames, size) for i in indices]
    labels = [p[1] for p in pairs]
    return (torch.from_numpy(np.stack([p[0] for p in pairs])), torch.tensor(labels, dtype=torch.long),
            [CAPTIONS[k] for k in labels])
