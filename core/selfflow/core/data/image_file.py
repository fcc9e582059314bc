"""Decoding image files with a bound on their size.

PIL only *warns* (``DecompressionBombWarning``) for an image between ``Image.MAX_IMAGE_PIXELS`` (about
89 Mpx, e.g. 9459²) and twice that, then decodes it — a 12000² PNG takes ~430 MB and seconds per file.
Every image decode goes through :func:`decode_rgb`, which turns both the warning and PIL's error into one
``ValueError`` naming the image: loose files (``prepare imagenet``/``image-text``, the eval folders) through
:func:`read_rgb` — the shard writer skips, counts and lists such a file; an eval folder stops with that
message — and the images inside training shards (REPA pixels, robot frames), which the shard stream then
skips and counts as a corrupt sample.
"""

from __future__ import annotations

import io
import os
import warnings
from typing import BinaryIO

import numpy as np
from PIL import Image


def decode_rgb(data: bytes | BinaryIO, name: str) -> Image.Image:
    """The encoded image ``data`` (bytes or a binary file) decoded as RGB; raises ``ValueError`` naming
    ``name`` when it has more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (and PIL's own errors for a corrupt
    image)."""
    source = io.BytesIO(data) if isinstance(data, bytes) else data
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(source) as im:
                if im.mode.startswith("I"):  # 16-bit grey ("I;16", "I"): convert() would clip 0–65535 to 255
                    scaled = (np.asarray(im, dtype=np.float64) / 257).round().clip(0, 255).astype(np.uint8)
                    return Image.fromarray(scaled, "L").convert("RGB")
                return im.convert("RGB")
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
            raise ValueError(f"image {name} is too large to decode: {e}") from None


def read_rgb(path: str | os.PathLike) -> Image.Image:
    """The image file at ``path`` decoded as RGB (:func:`decode_rgb`)."""
    # The file is opened here, not by PIL, so that it is closed when the size check raises inside open.
    with open(path, "rb") as f:
        return decode_rgb(f, str(path))
