"""Drawing the coloured shapes of the synthetic image and video datasets (one home for both)."""

from __future__ import annotations

import numpy as np

COLOURS = {
    "red": (0.9, 0.15, 0.1), "green": (0.15, 0.8, 0.2), "blue": (0.15, 0.3, 0.95),
    "yellow": (0.95, 0.85, 0.1), "magenta": (0.9, 0.2, 0.85), "cyan": (0.1, 0.85, 0.9),
}

def shape_mask(shape: str, xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    """Soft (anti-aliased, 1-pixel ramp) coverage of a shape of half-size ``r`` centred at ``(cx, cy)``."""
    dx, dy = xx - cx, yy - cy
    if shape == "square":
        d = np.maximum(abs(dx), abs(dy)) - r
    elif shape == "circle":
        d = np.hypot(dx, dy) - r
    elif shape == "diamond":
        d = (abs(dx) + abs(dy) - 1.3 * r) / np.sqrt(2)
    elif shape == "cross":
        arm = 0.5 * r  # arms as wide as a 4-px patch at the smallest size: a plus, not a blob
        d = np.minimum(np.maximum(abs(dx) - r, abs(dy) - arm), np.maximum(abs(dx) - arm, abs(dy) - r))
    elif shape == "triangle":  # pointing up: base at cy + r, apex at cy − r
        d = np.maximum(dy - r, (2 * abs(dx) - (dy + r)) / np.sqrt(5))
        d = np.maximum(d, -r - dy)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.clip(0.5 - d, 0.0, 1.0)
