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
counted and listed in ``stats/shard-XXXXXX.json``.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

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


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _encode(vae: Autoencoder, x: torch.Tensor, dtype: str) -> np.ndarray:
    """What a shard stores for a batch: SD-VAE moments (mean, std), else the model-space latent."""
    if isinstance(vae, SDVAE):
        return torch.cat(vae.moments(x), 1).cpu().numpy()
    return vae.encode(x).cpu().numpy().astype(dtype)


def write_shard(vae: Autoencoder, items: list[tuple[int, Path, int]], path: Path, opts: PrepareOptions) -> dict:
    """Encode ``items = [(index, file, label)]`` into ``path`` (atomically); returns the shard's counts."""
    import webdataset as wds

    loaded, skipped = [], []
    for index, f, label in items:
        try:
            with Image.open(f) as im:
                loaded.append((index, label, center_crop_adm(im.convert("RGB"), opts.image_size)))
        except Exception as e:  # truncated or corrupt file: skip it, count it, keep going
            skipped.append({"file": str(f), "error": f"{type(e).__name__}: {e}"})
    member = "moments" if isinstance(vae, SDVAE) else "latent"
    tmp = path.with_name(path.name + ".tmp")
    with wds.TarWriter(str(tmp)) as sink:
        for start in range(0, len(loaded), opts.batch_size):
            chunk = loaded[start: start + opts.batch_size]
            x = _to_tensor([im for _, _, im in chunk])
            stored = _encode(vae, x, opts.latent_dtype)
            if opts.flip:
                flipped = _encode(vae, x.flip(-1), opts.latent_dtype)
            for k, (index, label, im) in enumerate(chunk):
                rec = {"__key__": f"{index:08d}", f"{member}.npy": _npy(stored[k]), "cls": str(label).encode()}
                if opts.flip:
                    rec[f"{member}_flip.npy"] = _npy(flipped[k])
                if opts.store_pixels:
                    buf = io.BytesIO()
                    im.save(buf, format="PNG")
                    rec["png"] = buf.getvalue()
                sink.write(rec)
    os.replace(tmp, path)
    return {"written": len(loaded), "skipped": len(skipped), "skipped_files": skipped}


def prepare_imagenet(vae: Autoencoder, opts: PrepareOptions, rank: int = 0, world_size: int = 1,
                     progress: bool = True) -> dict:
    """This rank's shards; returns its totals (``written``, ``skipped``, ``shards``, ``already_done``)."""
    from tqdm import tqdm

    from selfflow.text.shards import write_json

    check_image_size(vae, opts.image_size)
    files, classes = list_images(Path(opts.src))
    out = Path(opts.out)
    (out / "stats").mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (out / "classes.json").write_text(json.dumps(classes))
        write_json(out / "codec.json", {
            "codec": name_of(vae), "image_size": opts.image_size,
            "stored": "moments" if isinstance(vae, SDVAE) else "latent",
            "latent_shape": list(latent_shape(vae, opts.image_size)), "flip": opts.flip,
            "scaling_factor": vae.scale if isinstance(vae, SDVAE) else None})
    n_shards = -(-len(files) // opts.shard_size)
    totals = {"written": 0, "skipped": 0, "shards": 0, "already_done": 0}
    mine = list(range(rank, n_shards, world_size))
    for k in tqdm(mine, disable=not progress, desc=f"prepare rank {rank}", unit="shard"):
        path = out / f"shard-{k:06d}.tar"
        stats_path = out / "stats" / f"shard-{k:06d}.json"
        if path.is_file() and stats_path.is_file():
            totals["already_done"] += 1
            continue
        lo = k * opts.shard_size
        items = [(i, f, label) for i, (f, label) in enumerate(files[lo: lo + opts.shard_size], start=lo)]
        stats = write_shard(vae, items, path, opts)
        stats_path.write_text(json.dumps(stats, indent=1))
        totals["written"] += stats["written"]
        totals["skipped"] += stats["skipped"]
        totals["shards"] += 1
    return totals


def summarize(out: Path) -> dict:
    """Counts over every shard's stats file (all ranks)."""
    written = skipped = 0
    for p in sorted((Path(out) / "stats").glob("shard-*.json")):
        s = json.loads(p.read_text())
        written, skipped = written + s["written"], skipped + s["skipped"]
    return {"written": written, "skipped": skipped}
