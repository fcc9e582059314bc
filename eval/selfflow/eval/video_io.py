"""Video sources for the video metrics: folders of videos (arrays, GIFs, frame folders, containers).

A video is uint8 ``(T, H, W, 3)``. A set of videos is a folder (one entry per video), an
``(N, T, H, W, 3)`` array, or a list of arrays / paths. ``iter_clips`` applies StyleGAN-V's clip
selection (one clip per video, short videos dropped and counted).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageSequence

from selfflow.core.data.image_file import read_rgb

VIDEO_SUFFIXES = (".mp4", ".webm", ".avi", ".mov", ".mkv")
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

VideoSource = str | os.PathLike | np.ndarray | torch.Tensor | Sequence[Any]


def is_stats_file(source: Any) -> bool:
    """True when ``source`` names a ``.npz`` of precomputed statistics instead of videos."""
    return isinstance(source, (str, os.PathLike)) and Path(source).suffix == ".npz"



def frame_order(path: Path) -> tuple:
    """Sort key of a frame file: its name with each run of digits read as a number, so ``frame2.png``
    comes before ``frame10.png`` (plain string order would put 10–19 before 2 and scramble the clip)."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part)
                 for part in re.split(r"(\d+)", path.name) if part)


def _read_container(path: Path) -> np.ndarray:
    try:
        import av
    except ImportError as err:
        raise ImportError(f"reading {path.suffix} videos needs PyAV (`pip install av`); or convert "
                          f"them to .npy (T, H, W, 3) uint8 arrays or folders of frames") from err
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if not frames:
        raise ValueError(f"{path}: no video frames")
    return np.stack(frames)


def read_video(path: str | os.PathLike) -> np.ndarray:
    """One video as uint8 (T, H, W, 3): ``.npy`` / ``.npz`` (first array), ``.gif``, a folder of
    frame images (in :func:`frame_order`), or ``.mp4``/``.webm``/... through PyAV."""
    p = Path(path)
    if p.is_dir():
        frames = sorted((f for f in p.iterdir() if f.suffix.lower() in FRAME_SUFFIXES), key=frame_order)
        if not frames:
            raise ValueError(f"{p}: a video folder must contain frame images")
        arr = np.stack([np.asarray(read_rgb(f)) for f in frames])
    elif p.suffix == ".npy":
        arr = np.load(p)
    elif p.suffix == ".npz":
        with np.load(p) as z:
            arr = z[z.files[0]]
    elif p.suffix.lower() == ".gif":
        with Image.open(p) as img:
            arr = np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(img)])
    elif p.suffix.lower() in VIDEO_SUFFIXES:
        arr = _read_container(p)
    else:
        raise ValueError(f"unsupported video file {p}")
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"{p}: expected uint8 (T, H, W, 3), got {arr.dtype} {arr.shape}")
    return arr


def list_videos(folder: str | os.PathLike) -> list[Path]:
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"video folder not found: {root}")
    # `selfflow sample --out-dir` keeps its per-batch part files in parts/ and its images' ADM batch in
    # samples_N.npz: neither is a video
    items = sorted(p for p in root.iterdir()
                   if (p.is_dir() and not (p.name == "parts" and any(p.glob("batch_*.npy"))))
                   or (p.suffix.lower() in (".npy", ".npz", ".gif", *VIDEO_SUFFIXES)
                       and not re.fullmatch(r"samples_\d+\.npz", p.name)))
    if not items:
        raise FileNotFoundError(f"no videos (.npy/.npz/.gif/.mp4/... or frame folders) in {root}")
    return items


def iter_videos(source: VideoSource) -> tuple[Iterator[np.ndarray], int]:
    """(iterator of uint8 (T, H, W, 3) videos, count) from a folder, an (N, T, H, W, 3) array,
    or a list of arrays / paths."""
    if isinstance(source, (str, os.PathLike)):
        files = list_videos(source)
        return (read_video(f) for f in files), len(files)
    if isinstance(source, torch.Tensor):
        source = source.detach().cpu().numpy()
    if isinstance(source, np.ndarray) and source.ndim != 5:
        raise ValueError(f"expected videos (N, T, H, W, 3), got shape {source.shape}")
    return (read_video(v) if isinstance(v, (str, os.PathLike)) else np.asarray(v)
            for v in source), len(source)


@dataclass
class ClipReport:
    used: int = 0
    skipped_short: int = 0
    longest_skipped: int = 0  # frames of the longest video skipped as too short
    lengths: list[int] = field(default_factory=list)


def iter_clips(source: VideoSource, num_frames: int, max_clips: int, *, start: int = 0, stride: int = 1,
               report: ClipReport | None = None) -> Iterator[np.ndarray]:
    """One clip per video: frames ``start, start+stride, …`` (``num_frames`` of them). Videos too
    short are skipped and counted in ``report``.

    "Too short" is StyleGAN-V's ``discard_short_videos`` rule: fewer than ``num_frames · stride``
    frames after ``start`` (not the ``(num_frames − 1) · stride + 1`` the clip strictly needs), so at
    stride 2 a 31-frame video is dropped, as the reference drops it.
    """
    report = report if report is not None else ClipReport()
    videos, _ = iter_videos(source)
    need = start + num_frames * stride
    for video in videos:
        if report.used >= max_clips:
            break
        if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
            raise ValueError(f"videos must be uint8 (T, H, W, 3), got {video.dtype} {video.shape}")
        if video.shape[0] < need:
            report.skipped_short += 1
            report.longest_skipped = max(report.longest_skipped, int(video.shape[0]))
            continue
        report.used += 1
        report.lengths.append(int(video.shape[0]))
        yield np.ascontiguousarray(video[start:need:stride])  # (num_frames, H, W, 3)


def iter_frames(source: VideoSource, max_frames: int) -> Iterator[np.ndarray]:
    """All frames of all videos, in order, as uint8 (H, W, 3) images, at most ``max_frames``."""
    videos, _ = iter_videos(source)
    n = 0
    for video in videos:
        for frame in video:
            if n >= max_frames:
                return
            n += 1
            yield frame
