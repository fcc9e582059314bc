"""Latent shards: webdataset tars of prepared samples (latents + captions + text embeddings).

Shared by every modality's ``prepare`` target and latent dataset, hence here beside the text encoders that
all conditioned modalities depend on (it holds nothing modality-specific).

Sample layout (one tar member per field, webdataset naming): ``__key__``, ``latent.npy`` (float16 raw
latent, e.g. ``(C, T, H, W)`` video or ``(C, T)`` audio), optional ``txt`` (caption), ``emb.npy``
(unpadded ``(Li, D)`` float16 caption embedding), ``cls`` (class index) and ``json`` (source info).

**Writing** (:func:`write_shards`) cuts the item list into fixed chunks; chunk ``k`` becomes shard
``{prefix}-{k:06d}.tar`` and is written by rank ``k mod world`` — names do not depend on the number of
ranks, so a run can resume with another world size. A shard is written to a temporary file and renamed
when complete; a rerun skips existing shards (resumable). An item whose processing raises (a corrupt
video, an unreadable WAV) is skipped, counted and listed in the shard's ``.json`` report.

**Reading** (:class:`LatentShardStream`) splits the shard list by node (rank) and by DataLoader worker,
shuffles the shard order per epoch with a seed shared by all ranks, and skips corrupt members and shards
(counted in ``skipped`` and logged with shard and key) instead of stopping the run: unreadable or truncated
``.npy``, a missing ``latent.npy``, a non-float or non-finite array, a latent whose shape differs from the
stream's first sample. The trainer reports the count (``data_skipped`` in ``metrics.jsonl``) and stops when
it exceeds ``train.max_bad_data_fraction`` of the samples read.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds

from selfflow.core.modality import DataStream

log = logging.getLogger("selfflow.shards")

Sample = dict[str, Any]


def npy_bytes(array: np.ndarray | torch.Tensor, dtype: Any = np.float16) -> bytes:
    if isinstance(array, torch.Tensor):
        array = array.detach().float().cpu().numpy()
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array, dtype=dtype), allow_pickle=False)
    return buf.getvalue()


def npy_load(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


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


def write_shards(items: Sequence[Any], process: Callable[[Any], Sample | None], out_dir: str | Path, *,
                 prefix: str = "shard", shard_size: int = 256, rank: int = 0, world_size: int = 1,
                 key: Callable[[Any], str] = str) -> dict[str, Any]:
    """Write this rank's shards of ``items``; ``process(item)`` returns a sample — ``latent`` (channels
    first), optional ``emb``, ``caption``, ``label``, ``info`` — or None to drop the item silently.

    Each shard's ``.json`` report holds its sample count, the failed items and per-channel sums of the
    latents (:func:`latent_stats` merges them into dataset statistics). Returns counts: ``written``
    samples, ``skipped`` (failed) items, ``shards`` written now and ``existing`` shards left alone because
    a previous run completed them.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {"written": 0, "skipped": 0, "shards": 0, "existing": 0}
    n_chunks = (len(items) + shard_size - 1) // shard_size
    for k in range(rank, n_chunks, world_size):
        path = out / f"{prefix}-{k:06d}.tar"
        if path.exists():
            report["existing"] += 1
            continue
        failed: list[dict[str, str]] = []
        written, sums = 0, None
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        with wds.TarWriter(str(tmp)) as sink:
            for item in items[k * shard_size:(k + 1) * shard_size]:
                name = key(item)
                try:
                    sample = process(item)
                    if sample is None:
                        continue
                    members = encode_sample(sample)
                except Exception as e:  # a bad input file must not stop a long preparation
                    log.warning("skipping %s: %s: %s", name, type(e).__name__, e)
                    failed.append({"item": name, "error": f"{type(e).__name__}: {e}"})
                    continue
                sink.write({"__key__": f"{k:06d}-{written:05d}", **members})
                written += 1
                z = torch.as_tensor(npy_load(members["latent.npy"]), dtype=torch.float64).flatten(1)
                part = torch.stack([z.new_full((z.shape[0],), z.shape[1]), z.sum(1), (z * z).sum(1)])
                sums = part if sums is None else sums + part
        stats = None if sums is None else {"count": sums[0].tolist(), "sum": sums[1].tolist(),
                                           "sumsq": sums[2].tolist()}
        (out / f"{prefix}-{k:06d}.json").write_text(
            json.dumps({"samples": written, "skipped": failed, "stats": stats}, indent=1))
        tmp.replace(path)
        report["written"] += written
        report["skipped"] += len(failed)
        report["shards"] += 1
    return report


def latent_stats(out_dir: str | Path) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of every latent in a shard directory (from the shards' reports)."""
    total = None
    for report in sorted(Path(out_dir).glob("*.json")):
        stats = json.loads(report.read_text()).get("stats") if report.name != "codec.json" else None
        if stats:
            part = torch.tensor([stats["count"], stats["sum"], stats["sumsq"]], dtype=torch.float64)
            total = part if total is None else total + part
    if total is None:
        raise FileNotFoundError(f"no shard reports with latent statistics in {out_dir}")
    mean = total[1] / total[0]
    std = (total[2] / total[0] - mean**2).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.tolist()


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Atomically write a JSON file (e.g. a shard directory's ``codec.json``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def split_by_rank(rank: int, world_size: int) -> Callable[[list[str]], list[str]]:
    """webdataset node splitter for an explicit (rank, world) — not read from the environment."""
    def split(urls):
        urls = list(urls)
        if len(urls) < world_size:
            raise ValueError(f"{len(urls)} shard(s) cannot be split over {world_size} ranks: write more "
                             "shards (prepare --shard-size smaller) or use fewer ranks")
        return urls[rank::world_size]
    return split


def _float_array(raw: Sample, member: str, ndim: int | None = None) -> torch.Tensor:
    """A finite floating-point array member as float32; raises naming the member if it is not one."""
    arr = npy_load(raw[member])
    if arr.dtype.kind != "f" or (ndim is not None and arr.ndim != ndim) or not np.isfinite(arr).all():
        raise ValueError(f"{member} of sample {raw.get('__key__')} is not a finite float array"
                         f"{'' if ndim is None else f' with {ndim} dims'} (dtype {arr.dtype}, shape {arr.shape})")
    return torch.from_numpy(arr.astype(np.float32))


def decode_sample(raw: Sample) -> Sample:
    """Tar member bytes → ``latent`` tensor, optional ``caption``, ``emb``, ``label``; raises if corrupt."""
    if "latent.npy" not in raw:
        raise KeyError(f"sample {raw.get('__key__')} has no latent.npy")
    out: Sample = {"key": raw["__key__"], "latent": _float_array(raw, "latent.npy")}
    if "txt" in raw:
        out["caption"] = raw["txt"].decode("utf-8")
    if "emb.npy" in raw:
        out["emb"] = _float_array(raw, "emb.npy", ndim=2)
    if "cls" in raw:
        out["label"] = int(raw["cls"])
    return out


class LatentShardStream(DataStream):
    """Endless batches of decoded samples from ``urls`` for one rank; ``collate(list) → batch``.

    Position = (epoch, samples consumed in the epoch), so resuming replays the epoch's order and skips
    what was already seen. Corrupt samples are skipped: ``skipped`` counts them (also in the state).
    """

    def __init__(self, urls: list[str], batch_size: int, collate: Callable[[list[Sample]], dict],
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        if not urls:
            raise FileNotFoundError("no shards found (run `selfflow prepare …` first, and check data.options.shards)")
        self.urls, self.batch_size, self.collate = sorted(urls), batch_size, collate
        self.seed, self.rank, self.world_size = seed, rank, world_size
        split_by_rank(rank, world_size)(self.urls)  # fail early with a clear message
        self.epoch = self.consumed = self.skipped = 0
        self.latent_shape: tuple[int, ...] | None = None  # of the first good sample: the others must match

    def _on_error(self, exn: Exception, shard: str = "?", key: str = "?") -> bool:
        self.skipped += 1
        log.warning("skipping a corrupt shard member (shard %s, key %s): %s: %s", shard, key,
                    type(exn).__name__, exn)
        return True  # keep going

    def _checked(self, sample: Sample) -> Sample:
        shape = tuple(sample["latent"].shape)
        if self.latent_shape is None:
            self.latent_shape = shape
        elif shape != self.latent_shape:
            raise ValueError(f"latent shape {shape} differs from the stream's {self.latent_shape}")
        return sample

    def _epoch_samples(self, epoch: int) -> Iterator[Sample]:
        urls = list(self.urls)
        random.Random(self.seed * 100003 + epoch).shuffle(urls)  # same order on every rank
        ds = wds.WebDataset(urls, nodesplitter=split_by_rank(self.rank, self.world_size),
                            workersplitter=wds.split_by_worker, shardshuffle=False, handler=self._on_error,
                            empty_check=False)
        for raw in ds:
            try:
                sample = self._checked(decode_sample(raw))
            except Exception as e:
                self._on_error(e, raw.get("__url__", "?"), raw.get("__key__", "?"))
                continue
            yield sample

    def __iter__(self) -> Iterator[dict]:
        while True:
            batch: list[Sample] = []
            produced = 0
            for i, sample in enumerate(self._epoch_samples(self.epoch)):
                if i < self.consumed:
                    continue
                batch.append(sample)
                produced += 1
                if len(batch) == self.batch_size:
                    self.consumed = i + 1
                    yield self.collate(batch)
                    batch = []
            if not produced and not self.consumed:
                raise RuntimeError(f"rank {self.rank} read no valid sample from its shards "
                                   f"({self.skipped} corrupt members skipped)")
            self.epoch, self.consumed = self.epoch + 1, 0  # a partial last batch is dropped

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "consumed": self.consumed, "skipped": self.skipped,
                "world_size": self.world_size, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["world_size"], state["batch_size"]) != (self.world_size, self.batch_size):
            raise ValueError("cannot resume a shard stream with another world size or batch size "
                             f"(was {state['world_size']}×{state['batch_size']}, now "
                             f"{self.world_size}×{self.batch_size})")
        self.epoch, self.consumed, self.skipped = int(state["epoch"]), int(state["consumed"]), int(state["skipped"])


def collate_samples(samples: list[Sample]) -> dict[str, Any]:
    """Decoded samples → ``latent (B, …)`` (raw, stacked), and ``labels``, ``captions``, ``emb`` (list of
    unpadded ``(Li, D)``) when every sample has them."""
    batch: dict[str, Any] = {"latent": torch.stack([s["latent"] for s in samples])}
    if all("label" in s for s in samples):
        batch["labels"] = torch.tensor([s["label"] for s in samples], dtype=torch.long)
    if all("caption" in s for s in samples):
        batch["captions"] = [s["caption"] for s in samples]
    if all("emb" in s for s in samples):
        batch["emb"] = [s["emb"] for s in samples]
    return batch


def shard_urls(pattern: str | Path) -> list[str]:
    """Tar files of a directory, or of a glob pattern (``dir/*.tar``)."""
    p = Path(pattern)
    files = sorted(p.glob("*.tar")) if p.is_dir() else sorted(Path(p.anchor or ".").glob(
        str(p.relative_to(p.anchor)) if p.is_absolute() else str(p)))
    return [str(f) for f in files]
