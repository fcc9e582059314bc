"""Reading frames with decord or PyAV (same frames), and writing MP4 and GIF.

decord is the fast path for random access; it is unmaintained and has no wheel for some platforms, so it
is imported lazily and PyAV (which bundles FFmpeg) takes over when it is missing, or (``auto``) when it fails on a file. Both return RGB uint8
``(N, H, W, 3)``, bit-identical for the same file (both decode the same bitstream with FFmpeg). Requested
frame indices are clamped to the number of frames actually decoded — containers may over-report it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np

Backend = Literal["auto", "decord", "pyav"]
T = TypeVar("T")


def has_decord() -> bool:
    return importlib.util.find_spec("decord") is not None


def resolve_backend(backend: Backend = "auto") -> str:
    """``auto`` → decord when installed, else PyAV. Asking for a missing decord is an error."""
    if backend == "auto":
        return "decord" if has_decord() else "pyav"
    if backend == "decord" and not has_decord():
        raise ImportError("video backend 'decord' is not installed (pip install decord; no wheel exists "
                          "for every platform) — use backend 'pyav' or 'auto'")
    if backend not in ("decord", "pyav"):
        raise ValueError(f"unknown video backend {backend!r} (auto, decord, pyav)")
    return backend


def _with_fallback(backend: Backend, decord_read: Callable[[], T], pyav_read: Callable[[], T]) -> T:
    """``decord_read()`` where decord is the backend, else ``pyav_read()``. Under ``auto`` a file decord fails on
    is read with PyAV: decord 0.6 refuses valid H.264 of some widths (16, 48: "from_size == to_size"), which
    skipped good videos as unreadable; a file neither reads is reported with both errors."""
    if resolve_backend(backend) != "decord":
        return pyav_read()
    if backend != "auto":
        return decord_read()
    try:
        return decord_read()
    except Exception as first:
        try:
            return pyav_read()
        except Exception as second:
            raise OSError(f"unreadable video (PyAV: {type(second).__name__}: {second}; decord: "
                          f"{type(first).__name__}: {str(first).splitlines()[0][:200]})") from second


def count_frames(path: str | Path, backend: Backend = "auto") -> int:
    """Number of decodable frames."""
    def with_decord() -> int:
        import decord

        return len(decord.VideoReader(str(path), num_threads=1))

    def with_pyav() -> int:
        import av

        with av.open(str(path)) as container:
            return sum(1 for _ in container.decode(video=0))

    return _with_fallback(backend, with_decord, with_pyav)


def video_fps(path: str | Path, backend: Backend = "auto") -> float:
    """The video's average frame rate (0 when the container gives none)."""
    def with_decord() -> float:
        import decord

        return float(decord.VideoReader(str(path), num_threads=1).get_avg_fps())

    def with_pyav() -> float:
        import av

        with av.open(str(path)) as container:
            rate = container.streams.video[0].average_rate
            return float(rate) if rate else 0.0

    return _with_fallback(backend, with_decord, with_pyav)


def read_frames(path: str | Path, indices: list[int], backend: Backend = "auto") -> np.ndarray:
    """Frames ``indices`` of a video as RGB uint8 ``(N, H, W, 3)`` (indices clamped to the last frame)."""
    if not indices:
        raise ValueError("read_frames needs at least one frame index")
    return _with_fallback(backend, lambda: _read_decord(path, indices), lambda: _read_pyav(path, indices))


def _read_decord(path: str | Path, indices: list[int]) -> np.ndarray:
    import decord

    reader = decord.VideoReader(str(path), num_threads=1)
    last = len(reader) - 1
    return reader.get_batch([min(max(i, 0), last) for i in indices]).asnumpy()


def _read_pyav(path: str | Path, indices: list[int]) -> np.ndarray:
    """Sequential decode up to the last wanted frame (clips are short and contiguous)."""
    import av

    wanted = [max(i, 0) for i in indices]
    keep, stop = set(wanted), max(wanted)
    frames: dict[int, np.ndarray] = {}
    last_n, last_frame = -1, None
    with av.open(str(path)) as container:
        for n, frame in enumerate(container.decode(video=0)):
            if n in keep:
                frames[n] = frame.to_ndarray(format="rgb24")
            last_n, last_frame = n, frame
            if n >= stop:
                break
        if last_frame is None:
            raise ValueError(f"{path}: no decodable video frame")
        if last_n not in frames:
            frames[last_n] = last_frame.to_ndarray(format="rgb24")
    return np.stack([frames[min(i, last_n)] for i in wanted])


def write_mp4(frames: np.ndarray, path: str | Path, fps: int = 8, crf: int = 18) -> Path:
    """RGB uint8 ``(T, H, W, 3)`` → H.264 MP4 (yuv420p, so H and W must be even)."""
    import av

    _, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"MP4 (yuv420p) needs even frame sizes, got {h}×{w}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.mp4")
    with av.open(str(tmp), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": str(crf)}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    tmp.replace(path)
    return path


def write_gif(frames: np.ndarray, path: str | Path, fps: int = 8) -> Path:
    """RGB uint8 ``(T, H, W, 3)`` → looping GIF."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return path
