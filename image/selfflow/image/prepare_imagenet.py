"""``selfflow prepare imagenet``: ImageNet train folder → latents of SD-VAE, FLUX.2 or RAE in webdataset shards.

Images (``root/<class dir>/<file>``, classes = sorted directory names → labels 0…) are ADM centre-cropped to
256 (halve with a box filter while the short side is ≥ 2× the target, bicubic-resize the short side to the
target, crop the centre), encoded, and written with ``cls`` and optionally ``png`` (the crop, for REPA).
What is stored depends on the codec (``codec.json`` in the output directory records which):

- ``sd_vae``: ``moments.npy`` = concat(mean, std) ``(8, 32, 32)`` float32, the *unscaled* posterior moments
  (REPA's practice): training draws ``z = (mean + std·ε)·0.18215`` afresh every epoch;
- ``flux2`` / ``rae``: ``latent.npy``, the deterministic model-space latent the codec's ``encode`` returns —
  FLUX.2's posterior mean already patchified 2×2 and BatchNorm-normalised ``(128, 16, 16)``, RAE's
  normalised DINOv2 tokens ``(768, 16, 16)``. Normalising once here (instead of storing raw latents and
  normalising at load) keeps the reader codec-agnostic; both normalisations are fixed by the checkpoint.
  ``--latent-dtype float16`` halves the size (RAE at fp32: 786 KB per image, ~1 TB for ImageNet).

``--flip`` also stores the mirrored image's moments / latent (``moments_flip.npy`` / ``latent_flip.npy``).
Shard ``k`` holds files ``[k·S, (k+1)·S)`` of the sorted list; shards are dealt to ranks round-robin and a
finished shard (renamed from ``.tmp`` when complete) is skipped on restart. Unreadable images are skipped,
counted and listed in the shard's report ``shard-XXXXXX.json`` — all done by the shared writer,
:func:`selfflow.core.data.shard_writer.write_shards`.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from selfflow.core.data.image_file import read_rgb
from selfflow.core.data.shard_format import npy_bytes
from selfflow.core.data.shard_writer import write_codec_record, write_shards

from .codecs import Autoencoder, check_image_size, latent_shape, name_of
from .sd_vae import SDVAE

IMAGE_EXTS = (".jpeg", ".jpg", ".png", ".webp", ".bmp")


def center_crop_adm(image: Image.Image, size: int) -> Image.Image:
    """ADM's centre crop (guided-diffusion ``center_crop_arr``)."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return Image.fromarray(arr[top: top + size, left: left + size])


def list_images(root: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """``[(file, label)]`` sorted by class then name, and the class names."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise FileNotFoundError(f"{root} has no class directories (expected ImageNet's train/<wnid>/*.JPEG)")
    files = [(f, label) for label, c in enumerate(classes) for f in sorted((root / c).iterdir())
             if f.suffix.lower() in IMAGE_EXTS]
    return files, classes


@dataclass
class PrepareOptions:
    src: Path
    out: Path
    image_size: int = 256
    shard_size: int = 1000
    batch_size: int = 32
    flip: bool = False
    store_pixels: bool = False
    latent_dtype: str = "float32"


def _to_tensor(images: list[Image.Image]) -> torch.Tensor:
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1


def _encode(vae: Autoencoder, x: torch.Tensor, dtype: str) -> np.ndarray:
    """What a shard stores for a batch: SD-VAE moments (mean, std), else the model-space latent."""
    if isinstance(vae, SDVAE):
        return torch.cat(vae.moments(x), 1).cpu().numpy()
    return vae.encode(x).cpu().numpy().astype(dtype)


@dataclass
class _ShardEncoder:
    """Loads one ``(index, file, label)`` (ADM crop) and encodes a batch of loaded images into tar members:
    ``{key: index:08d}``, ``moments.npy`` or ``latent.npy`` (+ ``_flip``), ``cls`` and optionally ``png``."""

    vae: Autoencoder
    opts: PrepareOptions

    def load(self, item: tuple[int, Path, int]) -> tuple[int, int, Image.Image]:
        index, f, label = item
        # a truncated, corrupt or over-large file raises: the writer skips and lists it
        return index, label, center_crop_adm(read_rgb(f), self.opts.image_size)

    def encode(self, chunk: list[tuple[int, int, Image.Image]]) -> list[dict[str, Any]]:
        member = "moments" if isinstance(self.vae, SDVAE) else "latent"
        x = _to_tensor([im for _, _, im in chunk])
        stored = _encode(self.vae, x, self.opts.latent_dtype)
        flipped = _encode(self.vae, x.flip(-1), self.opts.latent_dtype) if self.opts.flip else None
        out = []
        for k, (index, label, im) in enumerate(chunk):
            rec = {"__key__": f"{index:08d}", f"{member}.npy": npy_bytes(stored[k], stored.dtype),
                   "cls": str(label).encode()}
            if flipped is not None:
                rec[f"{member}_flip.npy"] = npy_bytes(flipped[k], flipped.dtype)
            if self.opts.store_pixels:
                buf = io.BytesIO()
                im.save(buf, format="PNG")
                rec["png"] = buf.getvalue()
            out.append(rec)
        return out


def prepare_imagenet(vae: Autoencoder, opts: PrepareOptions, rank: int = 0, world_size: int = 1,
                     progress: bool = True) -> dict:
    """This rank's shards (through the shared writer: atomic, resumable, unreadable images skipped and listed
    in each shard's ``.json`` report); returns its totals (``written``, ``skipped``, ``shards``, ``existing``)."""
    check_image_size(vae, opts.image_size)
    files, classes = list_images(Path(opts.src))
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (out / "classes.json").write_text(json.dumps(classes))
        write_codec_record(out, {
            "codec": name_of(vae), "image_size": opts.image_size,
            "stored": "moments" if isinstance(vae, SDVAE) else "latent",
            "latent_shape": list(latent_shape(vae, opts.image_size)), "flip": opts.flip,
            "scaling_factor": vae.scale if isinstance(vae, SDVAE) else None})
    encoder = _ShardEncoder(vae, opts)
    items = [(i, f, label) for i, (f, label) in enumerate(files)]
    return write_shards(items, encoder.load, out, shard_size=opts.shard_size, rank=rank, world_size=world_size,
                        key=lambda item: str(item[1]), encode_batch=encoder.encode, batch_size=opts.batch_size,
                        members=dict, progress=progress)


def summarize(out: Path) -> dict:
    """Counts over every shard's report (all ranks)."""
    written = skipped = 0
    for p in sorted(Path(out).glob("shard-*.json")):
        s = json.loads(p.read_text())
        written, skipped = written + s["samples"], skipped + len(s["skipped"])
    return {"written": written, "skipped": skipped}
