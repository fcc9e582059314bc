"""Training previews and sample grids given to a metric in place of samples.

``selfflow train`` writes previews as ``step_XXXXXXXX.{gif,mp4,wav}`` and ``selfflow sample`` without
``--out-dir`` writes ``sample_seed<S>.{…}``: a video preview is a tiled grid of clips, an audio preview several
samples joined by silence (eval/README_media.md: wrong to measure). FVD and FAD read them as one video or one
audio file each without complaint, so the metrics say so in their notes (:func:`listed_sets`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

PREVIEW_NAME = re.compile(r"(step_\d{8}|sample_seed\d+)\.(gif|mp4|webm|wav|flac|mp3|ogg)$")


def preview_note(files: list[Path], which: str) -> list[str]:
    """A note when some of ``files`` (the ``which`` set) are named as previews or grids; else none."""
    previews = [f.name for f in files if PREVIEW_NAME.search(f.name)]
    if not previews:
        return []
    return [f"{len(previews)} of the {len(files)} {which} files look like training previews or sample grids "
            f"(e.g. {previews[0]}: several samples tiled or joined in one file): score the per-sample files of "
            "`selfflow sample --out-dir` instead"]


def listed_sets(fake: Any, real: Any, list_files: Callable[[Any], list[Path]],
                is_statistics: Callable[[Any], bool]) -> list[str]:
    """List each folder among a metric's ``fake`` and ``real`` sets with ``list_files`` (statistics files and
    in-memory sets pass), so that a missing or empty folder, or one of other media, is refused before a network
    loads or the other set is embedded; returns the :func:`preview_note` of each."""
    notes = []
    for source, which in ((fake, "generated"), (real, "reference")):
        if isinstance(source, (str, os.PathLike)) and not is_statistics(source):
            notes += preview_note(list_files(source), which)
    return notes
