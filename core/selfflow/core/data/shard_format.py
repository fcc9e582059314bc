"""The shard sample format every ``selfflow prepare`` target writes and every shard stream reads.

A shard is a webdataset tar: one member per field, named ``{key}.{field}``. The common fields are
``latent.npy`` (float16 raw latent, e.g. ``(C, T, H, W)`` video or ``(C, T)`` audio), optional ``txt``
(caption), ``emb.npy`` (unpadded ``(Li, D)`` float16 caption embedding), ``cls`` (class index) and ``json``
(source info); a modality may add its own (ImageNet ``moments.npy``, RT-1 ``f000.jpg`` …) and decode them
with its own :data:`Decoder`. Decoders raise on anything corrupt; the stream skips and counts that sample.
"""

from __future__ import annotations

import functools
import glob
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data_facts import data_fact

Sample = dict[str, Any]
Decoder = Callable[[Sample, int], Sample]  # (raw tar members with ``__key__``, epoch) → decoded sample


def npy_bytes(array: np.ndarray | torch.Tensor, dtype: Any = np.float16) -> bytes:
    if isinstance(array, torch.Tensor):
        array = array.detach().float().cpu().numpy()
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array, dtype=dtype), allow_pickle=False)
    return buf.getvalue()


@functools.lru_cache(maxsize=256)
def _npy_header(prefix: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    """``(shape, fortran_order, dtype)`` of an ``.npy`` header. Cached: a shard repeats a few headers, and
    numpy parses each with ``ast.literal_eval`` (a third of a latent's decode time)."""
    buf = io.BytesIO(prefix)
    if np.lib.format.read_magic(buf) == (1, 0):
        return np.lib.format.read_array_header_1_0(buf)
    return np.lib.format.read_array_header_2_0(buf)


def npy_load(data: bytes, copy: bool = True) -> np.ndarray:
    """The array of ``.npy`` bytes (as ``np.load(..., allow_pickle=False)``): a writable copy, or with
    ``copy=False`` possibly a read-only view of ``data`` (for a caller that converts it anyway)."""
    if data[:6] == b"\x93NUMPY" and data[6] in (1, 2) and len(data) >= 12:
        width = 2 if data[6] == 1 else 4  # header-length field: 2 bytes in version 1, 4 in version 2
        offset = 8 + width + int.from_bytes(data[8:8 + width], "little")
        shape, fortran, dtype = _npy_header(bytes(data[:offset]))
        count = int(np.prod(shape))
        if not dtype.hasobject and len(data) == offset + count * dtype.itemsize:
            flat = np.frombuffer(data, dtype, count=count, offset=offset)
            array = flat.reshape(shape, order="F" if fortran else "C")
            return array.copy(order="K") if copy else array
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)  # anything unusual: numpy's checks and errors
    except ValueError as e:
        if "allow_pickle" not in str(e):
            raise
        # numpy's advice there is to load it unsafely: what is neither .npy magic nor an array is never unpickled
        raise ValueError("not a .npy array (garbage bytes, or a pickled object array, which is never loaded)") from None


def float_array(raw: Sample, member: str, ndim: int | None = None) -> np.ndarray:
    """A finite floating-point array member as float32; raises naming the member if it is not one (also
    for garbage bytes and pickled object arrays, which ``allow_pickle=False`` refuses)."""
    if member not in raw:
        raise KeyError(f"sample {raw.get('__key__')} has no {member}")
    arr = npy_load(raw[member], copy=False)
    out = arr.astype(np.float32) if arr.dtype.kind == "f" else None  # a new array: the view is never handed out
    if out is None or (ndim is not None and arr.ndim != ndim) or not np.isfinite(out).all():
        raise ValueError(f"{member} of sample {raw.get('__key__')} is not a finite float array"
                         f"{'' if ndim is None else f' with {ndim} dims'} (dtype {arr.dtype}, shape {arr.shape})")
    return out


def class_label(raw: Sample, num_classes: int | None) -> int:
    """The ``cls`` member as an int in ``[0, num_classes)`` (any int ≥ 0 when ``num_classes`` is None)."""
    text = raw["cls"].decode("utf-8", "replace").strip() if isinstance(raw["cls"], bytes) else str(raw["cls"])
    if not text.isdigit() or (num_classes is not None and int(text) >= num_classes):
        bound = "" if num_classes is None else f" < {num_classes}"
        raise ValueError(f"cls of sample {raw.get('__key__')} is {text[:20]!r}, not an integer 0 ≤ label{bound}")
    return int(text)


def encode_sample(sample: Sample) -> Sample:
    """``latent`` / ``emb`` arrays, ``caption``, ``label`` and ``info`` → tar members (see module doc)."""
    out: Sample = {"latent.npy": npy_bytes(sample["latent"])}
    if sample.get("emb") is not None:
        out["emb.npy"] = npy_bytes(sample["emb"])
    if sample.get("caption") is not None:
        out["txt"] = str(sample["caption"])
    if sample.get("label") is not None:
        out["cls"] = str(int(sample["label"]))
    if sample.get("info") is not None:
        out["json"] = json.dumps(sample["info"])
    return out


def decode_sample(raw: Sample, epoch: int = 0, num_classes: int | None = None) -> Sample:
    """Tar members → ``latent`` tensor, optional ``caption``, ``emb``, ``label``; raises if corrupt.
    (A :data:`Decoder`; bind ``num_classes`` with :func:`functools.partial`.)"""
    out: Sample = {"key": raw["__key__"], "latent": torch.from_numpy(float_array(raw, "latent.npy"))}
    if "txt" in raw:
        out["caption"] = raw["txt"].decode("utf-8")
    if "emb.npy" in raw:
        out["emb"] = torch.from_numpy(float_array(raw, "emb.npy", ndim=2))
    if "cls" in raw:
        out["label"] = class_label(raw, num_classes)
    return out


def collate_samples(samples: list[Sample]) -> dict[str, Any]:
    """Decoded samples → ``latent (B, …)`` (raw, stacked), and ``labels``, ``emb`` (list of unpadded
    ``(Li, D)``) when every sample has them, ``captions`` when any has one (``""`` for a medium prepared
    without its caption file: the empty caption, as ``prepare`` embeds it when it has a text encoder)."""
    batch: dict[str, Any] = {"latent": torch.stack([s["latent"] for s in samples])}
    if all("label" in s for s in samples):
        batch["labels"] = torch.tensor([s["label"] for s in samples], dtype=torch.long)
    if any("caption" in s for s in samples):
        batch["captions"] = [s.get("caption", "") for s in samples]
    if all("emb" in s for s in samples):
        batch["emb"] = [s["emb"] for s in samples]
    return batch


def shard_urls(spec: str | Path) -> list[str]:
    """The ``*.tar`` files of a directory, or of a glob pattern (``dir/*.tar``), sorted."""
    p = Path(spec)
    return sorted(glob.glob(str(p / "*.tar")) if p.is_dir() else glob.glob(str(spec)))


def required_shard_urls(spec: str | Path, target: str) -> list[str]:
    """:func:`shard_urls`, refusing none found, naming ``data.options.shards``'s value and the command that
    writes them (``target``: ``image-text``, ``video``, …)."""
    if not (urls := shard_urls(spec)):
        raise FileNotFoundError(f"data.options.shards: no shards (*.tar) at {spec}: run `selfflow prepare {target}` "
                                "first, or check the path")
    return urls


def check_shard_record(info: dict[str, Any], shards: str | Path, target: str, *, latent_dims: int,
                       codec_key: str, codec: str) -> None:
    """Refuse, naming ``codec.json``, shards a modality cannot train on: latents of another rank (audio's
    ``(C, N)`` read as video's ``(C, T, H, W)`` failed with "not enough values to unpack"), or of another codec
    than ``data.options.codec`` (Wan 2.2 shards decoded by Wan 2.1 trained and sampled at the wrong size)."""
    shape = info.get("latent_shape")
    if shape is not None and len(shape) != latent_dims:
        raise ValueError(f"{shards} holds latents of shape {shape} (codec.json), not the {latent_dims}-D latents of "
                         f"`selfflow prepare {target}`: is it another modality's shard folder?")
    if info.get(codec_key) is not None and info[codec_key] != codec:
        raise ValueError(f"{shards} holds {info[codec_key]} latents (codec.json {codec_key}), but data.options.codec "
                         f"is {codec}: set codec: {info[codec_key]}")


def read_codec_info(shards: str | Path, target: str, *, required: bool = True) -> dict[str, Any] | None:
    """The ``codec.json`` that ``selfflow prepare <target>`` wrote beside its shards (codec, latent shape,
    statistics …); a clear error when the directory is not such an output (``None`` if not ``required``)."""
    info = Path(shards) / "codec.json"

    def read() -> dict[str, Any] | None:
        if not info.is_file():
            if not required:
                return None
            raise FileNotFoundError(f"{info} not found: is {shards} a `selfflow prepare {target}` output?")
        try:
            return json.loads(info.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{info} is not valid JSON: {e}") from None

    return data_fact(str(info), read)  # recorded with the run: a trained model loads without its shards
