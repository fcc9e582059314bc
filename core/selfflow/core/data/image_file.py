"""Decoding image files with a bound on their size.

PIL only *warns* (``DecompressionBombWarning``) for an image between ``Image.MAX_IMAGE_PIXELS`` (about
89 Mpx, e.g. 9459²) and twice that, then decodes it — a 12000² PNG takes ~430 MB and seconds per file.
Every loose-file image reader (``prepare imagenet``/``image-text``, the eval folders) goes through
:func:`read_rgb`, which turns both the warning and PIL's error into one ``ValueError`` naming the file: the
shard writer skips, counts and lists such a file; an eval folder stops with that message.
"""

from __future__ import annotations

import os
import warnings

from PIL import Image


def read_rgb(path: str | os.PathLike) -> Image.Image:
    """The image file at ``path`` decoded as RGB; raises ``ValueError`` naming the file when it has more
    than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (and PIL's own errors for a corrupt file)."""
    # The file is opened here, not by PIL, so that it is closed when the size check raises inside open.
    with open(path, "rb") as f, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(f) as im:
                return im.convert("RGB")
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
            raise ValueError(f"image {path} is too large to decode: {e}") from None
