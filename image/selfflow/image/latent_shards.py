"""Training stream over the webdataset shards of ``selfflow prepare imagenet``.

A shard sample holds either ``moments.npy`` (SD-VAE: 8, h, w: posterior mean then std) or ``latent.npy``
(FLUX.2 / RAE: the model-space latent, used as it is), optionally the mirrored image's ``moments_flip.npy``
/ ``latent_flip.npy`` and ``png`` (the 256-px crop, for REPA), and ``cls``. Each epoch the shard list is permuted with the seed;
rank ``r`` of ``W`` reads shards ``r, r+W, …`` (split by node) and its data-loader workers split those again
(split by worker); samples are shuffled in a buffer. The latent is *sampled* from the stored moments,
``z = (mean + std·ε)·0.18215``, with ``ε`` (and the optional flip) drawn from a generator seeded by
``(seed, epoch, sample key)`` (stored latents are taken as they are, flipped with the same draw) — so a batch is a pure function of the position, and resuming (epoch, batch)
re-reads up to that position and continues with the same numbers.
"""

from __future__ import annotations

import glob
import io
import random
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from selfflow.core.modality import Batch, DataStream


def list_shards(spec: str | Path) -> list[str]:
    """A directory (all ``*.tar`` in it) or a glob, sorted; an empty result is an error."""
    p = Path(spec)
    found = sorted(glob.glob(str(p / "*.tar"))) if p.is_dir() else sorted(glob.glob(str(spec)))
    if not found:
        raise FileNotFoundError(f"no webdataset shards (*.tar) at {spec}: run `selfflow prepare imagenet` first")
    return found


def _decode(sample: dict[str, Any], rng: np.random.Generator, flip: bool, scale: float, pixels: bool) -> dict:
    member = "moments" if "moments.npy" in sample else "latent"
    use_flip = flip and f"{member}_flip.npy" in sample and rng.random() < 0.5
    m = np.load(io.BytesIO(sample[f"{member}_flip.npy" if use_flip else f"{member}.npy"])).astype(np.float32)
    if member == "moments":
        mean, std = np.split(m, 2, axis=0)
        z = (mean + std * rng.standard_normal(mean.shape, dtype=np.float32)) * scale
    else:
        z = m
    out = {"latents": torch.from_numpy(z), "labels": torch.tensor(int(sample["cls"].decode()))}
    if pixels:
        if "png" not in sample:
            raise KeyError(f"shard sample {sample['__key__']} has no png: prepare with --store-pixels for REPA")
        img = np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB"), dtype=np.float32)
        img = torch.from_numpy(img).permute(2, 0, 1) / 127.5 - 1
        out["pixels"] = img.flip(-1) if use_flip else img
    return out


class _ShardReader(IterableDataset):
    """One rank's epoch: batches from its shards, each worker handling a slice of them."""

    def __init__(self, shards: list[str], batch_size: int, seed: int, epoch: int, flip: bool, scale: float,
                 pixels: bool, shuffle_buffer: int):
        super().__init__()
        self.shards, self.batch_size, self.seed, self.epoch = shards, batch_size, seed, epoch
        self.flip, self.scale, self.pixels, self.buffer = flip, scale, pixels, shuffle_buffer

    def _samples(self, shards: list[str]) -> Iterator[dict[str, Any]]:
        import webdataset as wds

        if not shards:
            return
        yield from wds.WebDataset(shards, shardshuffle=False, nodesplitter=None, workersplitter=None,
                                  empty_check=False)

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        rng = random.Random(f"{self.seed}/{self.epoch}/{wid}")
        buf: list[dict[str, Any]] = []
        batch: list[dict] = []

        def emit(sample):
            key = sample["__key__"]
            r = np.random.default_rng([self.seed, self.epoch, int(key) if key.isdigit() else zlib.crc32(key.encode())])
            batch.append(_decode(sample, r, self.flip, self.scale, self.pixels))

        for sample in self._samples(self.shards[wid::nw]):
            buf.append(sample)
            if len(buf) >= self.buffer:
                emit(buf.pop(rng.randrange(len(buf))))
            if len(batch) == self.batch_size:
                yield _collate(batch)
                batch = []
        rng.shuffle(buf)
        for sample in buf:
            emit(sample)
            if len(batch) == self.batch_size:
                yield _collate(batch)
                batch = []


def _collate(items: list[dict[str, torch.Tensor]]) -> Batch:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


class LatentShardStream(DataStream):
    """Endless, resumable stream of ``{"latents", "labels"[, "pixels"]}`` batches for one rank."""

    def __init__(self, shards: list[str], batch_size: int, seed: int, rank: int, world_size: int, *,
                 flip: bool = False, scale: float = 0.18215, pixels: bool = False, num_workers: int = 0,
                 shuffle_buffer: int = 1000):
        if len(shards) < world_size:
            raise ValueError(f"{len(shards)} shard(s) for {world_size} ranks: every rank needs at least one")
        self.shards, self.batch_size, self.seed = shards, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.flip, self.scale, self.pixels = flip, scale, pixels
        self.num_workers, self.shuffle_buffer = num_workers, shuffle_buffer
        self.epoch, self.batch = 0, 0

    def _epoch_shards(self) -> list[str]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.shards))
        return [self.shards[i] for i in order[self.rank::self.world_size]]

    def __iter__(self) -> Iterator[Batch]:
        while True:
            reader = _ShardReader(self._epoch_shards(), self.batch_size, self.seed, self.epoch, self.flip,
                                  self.scale, self.pixels, self.shuffle_buffer)
            workers = min(self.num_workers, len(reader.shards))
            loader = DataLoader(reader, batch_size=None, num_workers=workers, persistent_workers=False)
            produced = 0
            for i, batch in enumerate(loader):
                produced += 1
                if i < self.batch:  # resuming inside this epoch: skip what was already consumed
                    continue
                self.batch = i + 1
                yield batch
            if produced == 0:
                raise RuntimeError(f"rank {self.rank}'s shards hold fewer than one batch of {self.batch_size}")
            self.epoch, self.batch = self.epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch": self.batch, "world_size": self.world_size,
                "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["world_size"], state["batch_size"]) != (self.world_size, self.batch_size):
            raise ValueError("cannot resume the latent-shard stream with another number of ranks or batch size "
                             f"(was {state['world_size']}×{state['batch_size']}, now "
                             f"{self.world_size}×{self.batch_size})")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
