"""Image readers: ADM ``.npz`` batches and image folders (:class:`ImageSource`, sharded, for the ADM
metrics) and :func:`iter_images` over folders, arrays or lists (for FD-DINOv2 and CLIP score).

ADM batch files hold ``arr_0``: uint8 (N, H, W, 3). Reference batches (e.g.
``VIRTUAL_imagenet256_labeled.npz``) also carry precomputed statistics ``mu``/``sigma`` (pool_3) and
``mu_s``/``sigma_s`` (spatial). Our own statistics files (``selfflow eval stats``) use the same keys
plus ``count``/``count_s`` and optionally ``pool_3`` features (for precision/recall).

``arr_0`` is streamed from the zip member batch by batch (also for ``savez_compressed`` files), so a
50k×256² batch (~10 GB) never has to fit in memory.
"""

from __future__ import annotations

import os
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image

from selfflow.core.data.image_file import read_rgb

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")

# A folder, a uint8 (N, H, W, 3) array or tensor, or a list of arrays / PIL images / paths.
ImageInput = str | os.PathLike | np.ndarray | Sequence[Any]


class ImageSource(ABC):
    """A sized collection of uint8 RGB images that yields NHWC batches of a contiguous index range."""

    path: Path

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def batches(self, batch_size: int, start: int = 0, stop: int | None = None) -> Iterator[np.ndarray]: ...


def _read_exact(f: IO[bytes], size: int, what: str) -> bytearray:
    data = bytearray()
    while len(data) < size:
        chunk = f.read(size - len(data))
        if not chunk:
            raise ValueError(f"{what}: truncated, expected {size} bytes, got {len(data)}")
        data += chunk
    return data  # a bytearray: np.frombuffer gives a writable array


def _zip(path: str | os.PathLike[str]) -> zipfile.ZipFile:
    """``path`` opened as the zip archive an ``.npz`` is; a file that is not one is a ValueError naming it."""
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise ValueError(f"{path} is not a readable .npz file ({e})") from None


@contextmanager
def _open_member(path: Path, key: str) -> Iterator[tuple[IO[bytes], tuple[int, ...], np.dtype, bool]]:
    with _zip(path) as zf:
        name = f"{key}.npy"
        if name not in zf.namelist():
            keys = sorted(n[:-4] for n in zf.namelist() if n.endswith(".npy"))
            raise KeyError(f"{path}: no array {key!r} (arrays: {keys})")
        with zf.open(name) as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"{path}:{key}: unsupported .npy format version {version}")
            yield f, shape, dtype, fortran


def npz_keys(path: str | os.PathLike[str]) -> list[str]:
    with _zip(path) as zf:
        return sorted(n[:-4] for n in zf.namelist() if n.endswith(".npy"))


class NpzImages(ImageSource):
    """``arr_0`` (uint8, N×H×W×3) of an ADM batch file, read lazily."""

    def __init__(self, path: str | os.PathLike[str], key: str = "arr_0") -> None:
        self.path, self.key = Path(path), key
        if not self.path.is_file():
            raise FileNotFoundError(f"no such npz file: {self.path}")
        with _open_member(self.path, key) as (_, shape, dtype, fortran):
            if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
                raise ValueError(f"{self.path}: {key!r} must be uint8 (N, H, W, 3) images, "
                                 f"got {dtype} {tuple(shape)}")
            self.shape, self.fortran = tuple(shape), fortran

    def __len__(self) -> int:
        return self.shape[0]

    def batches(self, batch_size: int, start: int = 0, stop: int | None = None) -> Iterator[np.ndarray]:
        stop = len(self) if stop is None else min(stop, len(self))
        if self.fortran:  # rare; cannot stream row-major slices
            with np.load(self.path) as z:
                arr = z[self.key]
            for i in range(start, stop, batch_size):
                yield np.ascontiguousarray(arr[i:min(i + batch_size, stop)])
            return
        item = int(np.prod(self.shape[1:]))
        with _open_member(self.path, self.key) as (f, _, _, _):
            skip = start * item  # zip members are not seekable when compressed: read through
            while skip > 0:
                skip -= len(_read_exact(f, min(skip, 1 << 24), str(self.path)))
            for i in range(start, stop, batch_size):
                n = min(batch_size, stop - i)
                data = _read_exact(f, n * item, f"{self.path}:{self.key}")
                yield np.frombuffer(data, dtype=np.uint8).reshape(n, *self.shape[1:])


class ArrayImages(ImageSource):
    """uint8 ``(N, H, W, 3)`` images held in memory (a run's generated samples, say)."""

    def __init__(self, images: np.ndarray, name: str = "samples") -> None:
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"{name}: expected uint8 (N, H, W, 3) images, got {images.dtype} {tuple(images.shape)}")
        self.images, self.path = images, Path(name)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def batches(self, batch_size: int, start: int = 0, stop: int | None = None) -> Iterator[np.ndarray]:
        stop = len(self) if stop is None else min(stop, len(self))
        for i in range(start, stop, batch_size):
            yield np.ascontiguousarray(self.images[i:min(i + batch_size, stop)])


class FolderImages(ImageSource):
    """PNG/JPEG/... files under a directory (recursive, sorted by relative path), converted to RGB."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.files = list_images(self.path)
        self._first_shape: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return len(self.files)

    def load(self, i: int) -> np.ndarray:
        return load_rgb(self.files[i])

    def check_headers(self) -> None:
        """Open every file's header (no pixels decoded: ~0.1 ms a file) and refuse, naming it, one that is no image
        or of another size than the first — before any features are extracted, not an hour into them."""
        first = None
        for f in self.files:
            try:
                with Image.open(f) as im:
                    size = im.size
            except OSError as e:  # PIL's UnidentifiedImageError among them
                raise OSError(f"{f}: not a readable image ({type(e).__name__}: {e})") from None
            first = first or (f, size)
            if size != first[1]:
                raise ValueError(f"images must share one size: {f} is {size[0]}x{size[1]}, {first[0]} is "
                                 f"{first[1][0]}x{first[1][1]}")

    def batches(self, batch_size: int, start: int = 0, stop: int | None = None) -> Iterator[np.ndarray]:
        stop = len(self) if stop is None else min(stop, len(self))
        for i in range(start, stop, batch_size):
            imgs = [self.load(j) for j in range(i, min(i + batch_size, stop))]
            if self._first_shape is None:  # the folder's first image, whatever range this reader covers
                self._first_shape = imgs[0].shape if i == 0 else self.load(0).shape
            first = self._first_shape
            for j, im in enumerate(imgs):
                if im.shape != first:
                    raise ValueError(f"images must share one size: {self.files[i + j]} is {im.shape[1]}x"
                                     f"{im.shape[0]}, {self.files[0]} is {first[1]}x{first[0]}")
            yield np.stack(imgs)


def open_images(path: str | os.PathLike[str]) -> ImageSource:
    """An image folder or an ``.npz`` with ``arr_0``."""
    p = Path(path)
    if p.is_dir():
        return FolderImages(p)
    if p.suffix == ".npz":
        return NpzImages(p)
    if not p.exists():
        raise FileNotFoundError(f"no such image folder or npz file: {p}")
    raise ValueError(f"{p}: expected an image directory or an .npz file with 'arr_0'")


def image_size(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    """``(width, height)`` of an image folder's first file or an ``.npz``'s ``arr_0``, read from headers only;
    None for a statistics-only file."""
    p = Path(path)
    if p.is_dir():
        with Image.open(list_images(p)[0]) as im:
            return im.size
    if "arr_0" not in npz_keys(p):
        return None
    shape = NpzImages(p).shape
    return shape[2], shape[1]


def read_reference_stats(path: str | os.PathLike[str]) -> dict[str, np.ndarray] | None:
    """``mu``/``sigma``/``mu_s``/``sigma_s`` (float64) if all four are stored in the npz, else None."""
    keys = set(npz_keys(path))
    if not set(STAT_KEYS) <= keys:
        return None
    with np.load(path) as z:
        out = {k: z[k].astype(np.float64) for k in STAT_KEYS}
        for k in ("count", "count_s"):
            if k in keys:
                out[k] = z[k]
    for mu, sigma in (("mu", "sigma"), ("mu_s", "sigma_s")):  # checked here, before any features are extracted
        d = out[mu].shape[0] if out[mu].ndim == 1 else None
        if d is None or out[sigma].shape != (d, d):
            raise ValueError(f"{path}: {mu} must be (D,) and {sigma} (D, D); got {out[mu].shape}, {out[sigma].shape}")
    return out



def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files of a folder (recursively), sorted by path; FileNotFoundError without the folder,
    ValueError when it holds no images."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    return files


def load_rgb(path: str | os.PathLike) -> np.ndarray:
    """An image file as uint8 RGB (H, W, 3)."""
    return np.asarray(read_rgb(path), dtype=np.uint8)


def iter_images(source: ImageInput) -> tuple[Iterator[np.ndarray], int]:
    """Uint8 RGB (H, W, 3) images from a folder, an (N, H, W, 3) uint8 array/tensor, or a list of
    arrays / PIL images / paths. Returns (iterator, count)."""
    if isinstance(source, (str, os.PathLike)):
        files = list_images(source)
        return (load_rgb(f) for f in files), len(files)
    if hasattr(source, "detach"):  # a torch tensor
        source = source.detach().cpu().numpy()
    if isinstance(source, np.ndarray):
        if source.ndim != 4 or source.shape[-1] != 3 or source.dtype != np.uint8:
            raise ValueError(f"expected uint8 images of shape (N, H, W, 3), got {source.dtype} "
                             f"{tuple(source.shape)}")
        return iter(source), len(source)

    def convert(item: Any) -> np.ndarray:
        if isinstance(item, Image.Image):
            return np.asarray(item.convert("RGB"), dtype=np.uint8)
        if isinstance(item, (str, os.PathLike)):
            return load_rgb(item)
        arr = np.asarray(item)
        if arr.ndim != 3 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
            raise ValueError(f"expected a uint8 (H, W, 3) image, got {arr.dtype} {arr.shape}")
        return arr

    return (convert(x) for x in source), len(source)
