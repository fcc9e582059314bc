"""Image grids with class-name headers, written as PNG."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``(B, 3, H, W)`` in [-1, 1] → ``(B, H, W, 3)`` uint8."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images: torch.Tensor, path: str | Path, labels: torch.Tensor | None = None,
              class_names: list[str] | None = None, columns: int | None = None, scale: int = 3) -> Path:
    """Tile ``images (B, 3, H, W)`` into a PNG. With labels, column ``j`` holds samples of class ``j``
    (as the trainer lays them out) and carries the class name as a header."""
    arr = to_uint8(images)
    b, h, w, _ = arr.shape
    cols = columns or (len(class_names) if class_names and labels is not None else math.ceil(math.sqrt(b)))
    cols = max(1, min(cols, b))
    rows = math.ceil(b / cols)
    pad, header = 2, (12 if class_names and labels is not None else 0)
    cw, ch = w * scale + pad, h * scale + pad
    canvas = Image.new("RGB", (cols * cw + pad, rows * ch + pad + header), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for i in range(b):
        r, c = divmod(i, cols)
        tile = Image.fromarray(arr[i]).resize((w * scale, h * scale), Image.NEAREST)
        canvas.paste(tile, (pad + c * cw, header + pad + r * ch))
    if header:
        for c in range(cols):
            if c < b:
                name = class_names[int(labels[c])]
                draw.text((pad + c * cw, 0), name[: max(4, (cw // 6))], fill=(0, 0, 0), font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
