"""Decoding the webdataset shards of ``selfflow prepare imagenet`` for the shared shard stream.

A shard sample holds either ``moments.npy`` (SD-VAE: 8, h, w: posterior mean then std) or ``latent.npy``
(FLUX.2 / RAE: the model-space latent, used as it is), optionally the mirrored image's ``moments_flip.npy``
/ ``latent_flip.npy`` and ``png`` (the 256-px crop, for REPA), and ``cls``. The latent is *sampled* from
the stored moments, ``z = (mean + std·ε)·0.18215``, with ``ε`` (and the optional flip) drawn from a
generator seeded by ``(seed, epoch, sample key)`` (stored latents are taken as they are, flipped with the
same draw) — so a batch is a pure function of the stream position, and a resumed run continues with the
same numbers. Reading, rank split, shuffling, workers and the skip policy are
:class:`selfflow.core.data.shard_stream.ShardStream`'s.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch

from selfflow.core.data.image_file import decode_rgb
from selfflow.core.data.shard_format import Sample, class_label, float_array, required_shard_urls
from selfflow.core.data.shard_stream import ShardStream
from selfflow.core.modality import Batch


@dataclass(frozen=True)
class ImageNetDecoder:
    """Raw members → ``latents (C, h, w)``, ``labels`` and optionally ``pixels (3, H, W)``; raises on a
    corrupt sample (garbage or non-finite moments, a label outside ``[0, num_classes)``, no ``png``, a
    ``png`` over PIL's decompression-bomb bound)."""

    seed: int
    flip: bool
    scale: float
    pixels: bool
    num_classes: int

    def __call__(self, raw: Sample, epoch: int) -> Sample:
        key = raw["__key__"]
        rng = np.random.default_rng([self.seed, epoch, int(key) if key.isdigit() else zlib.crc32(key.encode())])
        member = "moments" if "moments.npy" in raw else "latent"
        use_flip = self.flip and f"{member}_flip.npy" in raw and rng.random() < 0.5
        m = float_array(raw, f"{member}_flip.npy" if use_flip else f"{member}.npy")
        if member == "moments":
            mean, std = np.split(m, 2, axis=0)
            z = (mean + std * rng.standard_normal(mean.shape, dtype=np.float32)) * self.scale
        else:
            z = m
        if "cls" not in raw:
            raise KeyError(f"sample {key} has no cls (class label)")
        out = {"latents": torch.from_numpy(z), "labels": torch.tensor(class_label(raw, self.num_classes))}
        if self.pixels:
            if "png" not in raw:
                raise KeyError(f"shard sample {key} has no png: prepare with --store-pixels for REPA")
            img = np.asarray(decode_rgb(raw["png"], f"{key}.png"), dtype=np.float32)
            img = torch.from_numpy(img).permute(2, 0, 1) / 127.5 - 1
            out["pixels"] = img.flip(-1) if use_flip else img
        return out


def collate_imagenet(items: list[dict[str, torch.Tensor]]) -> Batch:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def imagenet_stream(spec: str, batch_size: int, seed: int, rank: int, world_size: int, *, flip: bool = False,
                    scale: float = 0.18215, pixels: bool = False, num_classes: int = 1000, num_workers: int = 0,
                    shuffle_buffer: int = 1000) -> ShardStream:
    """Endless, resumable ``{"latents", "labels"[, "pixels"]}`` batches of the shards at ``spec`` (a
    directory or a glob) for one rank."""
    return ShardStream(required_shard_urls(spec, "imagenet"), batch_size, collate_imagenet, seed, rank, world_size,
                       shape_key="latents", decode=ImageNetDecoder(seed, flip, scale, pixels, num_classes),
                       num_workers=num_workers, shuffle_buffer=shuffle_buffer)


