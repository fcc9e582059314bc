"""A class-conditional toy dataset of coloured shapes, generated on the fly.

Each class is a (shape, colour) pair; shapes and colours are shared between classes so a model must learn
both. A sample depends only on ``(seed, index)``: any rank can make any sample, and a stream's position
is a single integer, which makes resuming exact.
"""

from __future__ import annotations

import numpy as np
import torch

from selfflow.core.data.shapes import COLOURS, shape_mask

CLASSES: list[tuple[str, str]] = [
    ("red", "square"), ("red", "circle"), ("green", "triangle"), ("green", "square"),
    ("blue", "circle"), ("blue", "cross"), ("yellow", "diamond"), ("yellow", "triangle"),
    ("magenta", "cross"), ("cyan", "diamond"),
]
CLASS_NAMES = [f"{c} {s}" for c, s in CLASSES]
CAPTIONS = [f"a {c} {s}" for c, s in CLASSES]


def render_sample(seed: int, index: int, size: int = 32) -> tuple[np.ndarray, int]:
    """Sample ``index`` of the stream ``seed``: an image ``(3, size, size)`` float32 in [-1, 1] and its label."""
    rng = np.random.default_rng([seed, index])
    label = int(rng.integers(len(CLASSES)))
    colour, shape = CLASSES[label]
    r = rng.uniform(0.2, 0.3) * size  # ≥ 12 px across at 32 px: each shape spans ≥ 3×3 patches of 4 px
    cx, cy = rng.uniform(r + 1, size - r - 1, size=2)
    rgb = np.clip(np.array(COLOURS[colour]) * rng.uniform(0.85, 1.1), 0, 1)
    background = rng.uniform(0.0, 0.12)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    alpha = shape_mask(shape, xx, yy, cx, cy, r)
    img = background * (1 - alpha) + alpha * rgb[:, None, None]
    return (img * 2 - 1).astype(np.float32), label


def render_batch(seed: int, indices: range | list[int], size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(B, 3, size, size)`` in [-1, 1] and labels ``(B,)`` for the given stream indices."""
    pairs = [render_sample(seed, i, size) for i in indices]
    images = torch.from_numpy(np.stack([p[0] for p in pairs]))
    labels = torch.tensor([p[1] for p in pairs], dtype=torch.long)
    return images, labels
