"""Training previews and sample grids given to a metric in place of samples.

``selfflow train`` writes previews as ``step_XXXXXXXX.{gif,mp4,wav}`` and ``selfflow sample`` without
``--out-dir`` writes ``sample_seed<S>.{…}``: a video preview is a tiled grid of clips, an audio preview several
samples joined by silence (eval/README_media.md: wrong to measure). FVD and FAD read them as one video or one
audio file each without complaint, so the metrics say so in their notes.
"""

from __future__ import annotations

import re
from pathlib import Path

PREVIEW_NAME = re.compile(r"(step_\d{8}|sample_seed\d+)\.(gif|mp4|webm|wav|flac|mp3|ogg)$")


def preview_note(files: list[Path], which: str) -> list[str]:
    """A note when some of ``files`` (the ``which`` set) are named as previews or grids; else none."""
    previews = [f.name for f in files if PREVIEW_NAME.search(f.name)]
    if not previews:
        return []
    return [f"{len(previews)} of the {len(files)} {which} files look like training previews or sample grids "
            f"(e.g. {previews[0]}: several samples tiled or joined in one file): score the per-sample files of "
            "`selfflow sample --out-dir` instead"]
