"""Writing shards: the one writer behind every ``selfflow prepare`` target.

:func:`write_shards` cuts the item list, in a seeded random order, into fixed chunks; chunk ``k`` becomes shard
``{prefix}-{k:06d}.tar`` and is written by rank ``k mod world`` — names do not depend on the number of
ranks, so a run can resume with another world size. A shard is written to a temporary file and renamed
when complete; a rerun skips existing shards (resumable). An item whose processing raises (a corrupt
video, an unreadable WAV) is skipped, counted and listed in the shard's ``.json`` report, which also holds
the sample count (the stream counts an unreadable shard as that many lost samples) and per-channel latent
sums (:func:`selfflow.core.data.stats.latent_stats`).

**Why the random order.** Inputs are listed sorted (ImageNet by class, media by folder), and the reader mixes
only within a buffer of a few shards: sorted shards would give batches of a handful of classes — far from the
i.i.d. batches of REPA's or SiT's loaders. ``{prefix}.order.json`` records the seed, the item count and a digest
of the item keys (below the folder they share: the input may move between two runs); a rerun with another list
(files added, another seed) is refused instead of mixing two orders. A directory whose shards were written
before that record existed keeps its sorted order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from tqdm import tqdm

from .shard_format import Sample, encode_sample, npy_load

log = logging.getLogger("selfflow.shards")


def write_shards(items: Sequence[Any], process: Callable[[Any], Any], out_dir: str | Path, *,
                 prefix: str = "shard", shard_size: int = 256, rank: int = 0, world_size: int = 1,
                 key: Callable[[Any], str] = str, encode_batch: Callable[[list[Any]], list[Sample]] | None = None,
                 batch_size: int = 1, members: Callable[[Sample], Sample] = encode_sample,
                 progress: bool = False, order_seed: int | None = 0) -> dict[str, Any]:
    """Write this rank's shards of ``items``.

    ``process(item)`` returns a sample — ``latent`` (channels first), optional ``emb``, ``caption``,
    ``label``, ``info`` — or None to drop the item silently; an exception skips and lists the item. With
    ``encode_batch``, ``process`` only loads an item and ``encode_batch`` turns up to ``batch_size`` loaded
    items into samples at once (a VAE on a batch of images). ``members(sample)`` gives the tar members
    (default :func:`~.shard_format.encode_sample`); a ``__key__`` among them replaces the default key
    ``{shard:06d}-{n:05d}``. ``progress``: a bar over this rank's shards. ``order_seed``: the seed of the
    item order (None: as given; see the module doc). Returns counts: ``written`` samples, ``skipped`` (failed) items, ``shards``
    written now and ``existing`` shards left alone because a previous run completed them.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {"written": 0, "skipped": 0, "shards": 0, "existing": 0}
    order = item_order([key(item) for item in items], out, prefix, order_seed, shard_size)
    n_chunks = (len(items) + shard_size - 1) // shard_size
    for k in tqdm(range(rank, n_chunks, world_size), disable=not progress, desc=f"prepare rank {rank}", unit="shard"):
        path = out / f"{prefix}-{k:06d}.tar"
        if path.exists():
            report["existing"] += 1
            continue
        for stale in out.glob(f"{prefix}-{k:06d}.tar.*.tmp"):  # a killed run's half-written shard k: only this
            stale.unlink(missing_ok=True)  # rank writes shard k, so no live writer's file
        failed: list[dict[str, str]] = []
        loaded = []
        for item in (items[i] for i in order[k * shard_size:(k + 1) * shard_size]):
            try:
                sample = process(item)
                if sample is not None:
                    loaded.append((key(item), sample))
            except Exception as e:  # a bad input file must not stop a long preparation
                log.warning("skipping %s: %s: %s", key(item), type(e).__name__, e)
                failed.append({"item": key(item), "error": f"{type(e).__name__}: {e}"})
        written, sums = 0, None
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        # An integer mtime keeps every member a plain ustar header: webdataset's default float time.time()
        # adds a PAX header per member, which the reader then parses (half of its time).
        with wds.TarWriter(str(tmp), mtime=int(time.time())) as sink:
            for start in range(0, len(loaded), batch_size if encode_batch else len(loaded) or 1):
                chunk = loaded[start:start + batch_size] if encode_batch else loaded
                samples = encode_batch([s for _, s in chunk]) if encode_batch else [s for _, s in chunk]
                for (name, _), sample in zip(chunk, samples):
                    try:
                        record = members(sample)
                    except Exception as e:  # e.g. an array that cannot be stored: the item is skipped
                        log.warning("skipping %s: %s: %s", name, type(e).__name__, e)
                        failed.append({"item": name, "error": f"{type(e).__name__}: {e}"})
                        continue
                    sink.write({"__key__": f"{k:06d}-{written:05d}", **record})
                    written += 1
                    if "latent.npy" in record:
                        z = torch.as_tensor(npy_load(record["latent.npy"]), dtype=torch.float64).flatten(1)
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


def keys_digest(keys: list[str], below_shared_folder: bool = True) -> str:
    """SHA-256 of the item keys; ``below_shared_folder``: each without the longest prefix up to a ``/`` that all
    share, so that a list of files is the same list wherever its folder lies (the input moved between two runs of
    a prepare, or is mounted elsewhere on another node). Records from before hashed the keys whole."""
    if below_shared_folder and keys:
        cut = os.path.commonprefix(keys).rfind("/") + 1  # noqa: RUF071 - keys are strings, not all paths
        keys = [k[cut:] for k in keys]
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()


def item_order(keys: list[str], out: Path, prefix: str, seed: int | None,
               shard_size: int | None = None) -> list[int]:
    """The indices of the items in shard order: a ``seed``-ed permutation, checked against (or written as)
    ``{prefix}.order.json``; raises ``ValueError`` when the directory was cut from another list, order or shard
    size (a rerun with another ``--shard-size`` took the old shards as done and lost the items between)."""
    record = {"items": len(keys), "seed": seed, "keys_sha256": keys_digest(keys), "shard_size": shard_size}
    path = out / f"{prefix}.order.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("keys_sha256") == keys_digest(keys, below_shared_folder=False):  # an older record, the same keys
            old["keys_sha256"] = record["keys_sha256"]
        # a record from before the shard size was kept says nothing of it
        compared = [k for k in record if k in old or k != "shard_size"]
        if any(old.get(k) != record[k] for k in compared):
            changed = ", ".join(f"{k} {old.get(k)!r} then, {record[k]!r} now" for k in compared
                                if old.get(k) != record[k])
            raise ValueError(f"{out} holds {prefix} shards cut from another item list or order ({changed}; "
                             f"{path}): prepare into a new directory, or give the same inputs")
    elif any(out.glob(f"{prefix}-*.tar")):  # written before the order record existed: sorted, keep it
        log.warning("%s: shards without %s keep the sorted item order of the run that began them", out, path.name)
        seed = None
    else:  # every rank (the same record): ranks may run at different times, and shards imply a record
        write_json(path, record)
    order = list(range(len(keys)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    return order


CODEC_FILE = "codec.json"


def write_codec_record(out_dir: str | Path, record: dict[str, Any]) -> None:
    """``out_dir/codec.json``: what every shard there was prepared with. A rerun finishes an interrupted
    preparation, so it must ask for the same: one that changes any of it (another ``--image-size``, codec or
    text encoder) is refused, naming the keys — the shards already written hold the old data, and a rewritten
    record would describe data they do not hold. The preview captions may differ (they are drawn again)."""
    out = Path(out_dir)
    path = out / CODEC_FILE
    if path.is_file() and any(out.glob("*.tar")):
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            old = None  # unreadable: the shards' own record is lost, writing it again is all that can be done
        new = json.loads(json.dumps(record))
        if isinstance(old, dict) and (changed := [k for k in new if k != "sample_captions" and old.get(k) != new[k]]):
            said = "; ".join(f"{k} {json.dumps(old.get(k))} then, {json.dumps(new[k])} now" for k in changed)
            raise ValueError(f"{out} holds shards prepared with other settings ({said}; {path}): prepare into a "
                             "new directory, or give the same settings to finish it")
    write_json(path, record)


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Atomically write a JSON file (e.g. a shard directory's ``codec.json``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)
