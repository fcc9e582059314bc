"""ImageNet latent-shard faults (issue #16 items 1 and 3), read by the training reader itself.

Shards as ``selfflow prepare imagenet`` writes them (``moments.npy`` + ``cls`` per sample, a ``.json``
report with the sample count) hold bad members among good ones — garbage or pickled ``moments.npy``, a
wrong shape, non-finite moments, class labels ``cat``, 999999 and −3, a missing ``cls`` — and whole-shard
faults: a tar cut in the middle and a shard of garbage; and, read with ``pixels`` (REPA), ``png`` members
over PIL's decompression-bomb bound (12000², which PIL alone only warns about and decodes, and 20000²).
Read for one epoch by
:func:`selfflow.image.latent_shards.imagenet_stream`, every bad member must be skipped and logged with its
shard and key, every good sample of an intact shard delivered exactly once, and a lost shard must count
all the samples its report lists (so ``train.max_bad_data_fraction`` sees half the data gone when half
the shards are unreadable).
"""

from __future__ import annotations

import io
import json
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

from .common import ROOT, Outcome, Timer
from .corrupt_data import _Capture, _npy

SHAPE = (8, 2, 2)  # SD-VAE moments (mean, std) of a 16-px image


def _pickled() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    return buf.getvalue()


MEMBER_FAULTS: dict[str, Any] = {
    "garbage moments.npy": lambda good: {"moments.npy": b"\x93NUMPY garbage" * 3, "cls": b"1"},
    "pickled object moments.npy": lambda good: {"moments.npy": _pickled(), "cls": b"1"},
    "wrong moments shape": lambda good: {"moments.npy": _npy(np.ones((8, 3, 3), np.float16)), "cls": b"1"},
    "NaN moments": lambda good: {"moments.npy": _npy(np.full_like(good, np.nan)), "cls": b"1"},
    "class label 'cat'": lambda good: {"moments.npy": _npy(good), "cls": b"cat"},
    "class label 999999": lambda good: {"moments.npy": _npy(good), "cls": b"999999"},
    "class label -3": lambda good: {"moments.npy": _npy(good), "cls": b"-3"},
    "missing cls": lambda good: {"moments.npy": _npy(good)},
}


def _write_shard(path: Path, members: list[tuple[str, str]]) -> None:
    with wds.TarWriter(str(path)) as sink:
        for kind, key in members:
            good = np.random.default_rng(int(key[1:])).standard_normal(SHAPE).astype(np.float16)
            # a good sample's label is its number: what the test recognises it by after the sampling
            fields = {"moments.npy": _npy(good), "cls": key[1:].encode()} if kind == "good" else MEMBER_FAULTS[kind](good)
            sink.write({"__key__": key, **fields})
    path.with_suffix(".json").write_text(json.dumps({"samples": len(members), "skipped": []}))


def _read_epoch(folder: Path, seed: int, pixels: bool = False) -> tuple[list[str], int, list[str]]:
    """(keys of the good samples delivered in epoch 0, samples counted as skipped, distinct warnings).

    The stream reads on into epoch 1 to fill the batch after the last one of epoch 0, so a warning may come
    twice (once per epoch, same text) and is counted once."""
    from selfflow.image.latent_shards import imagenet_stream

    handler = _Capture()
    logging.getLogger("selfflow.shards").addHandler(handler)
    try:
        stream = imagenet_stream(str(folder), 1, seed, 0, 1, num_classes=1000, shuffle_buffer=4, pixels=pixels)
        it, seen = iter(stream), []
        while (batch := next(it)) and stream.epoch == 0:
            seen.append(f"g{int(batch['labels'][0]):04d}")
    finally:
        logging.getLogger("selfflow.shards").removeHandler(handler)
    lines = list(dict.fromkeys(handler.lines))
    return seen, sum(int(m.group(1)) for x in lines if (m := re.match(r"skipping (\d+) ", x))), lines


def member_faults(work: Path, trials: int = 2, per_kind: int = 3, seed: int = 0) -> list[Outcome]:
    outs = {k: Outcome("data", f"ImageNet latent shard: {k} (item 1)", "skipped, counted, logged with shard and key")
            for k in MEMBER_FAULTS}
    rng = random.Random(seed)
    for t in range(trials):
        folder = work / f"latent_{t}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        members = [("good", f"g{i:04d}") for i in range(24)]
        # the first sample of every shard is good: the stream takes its shape as the reference
        bad = [(kind, f"b{1000 * (t + 1) + j:04d}") for j, kind in
               enumerate(k for k in MEMBER_FAULTS for _ in range(per_kind))]
        rng.shuffle(bad)
        shards = [members[s::3] for s in range(3)]
        for s, part in enumerate(shards):
            _write_shard(folder / f"imagenet-{s:06d}.tar", part[:1] + sorted(part[1:] + bad[s::3]))
        with Timer(outs["garbage moments.npy"]):
            seen, skipped, lines = _read_epoch(folder, t)
        delivered = seen
        for kind, key in bad:
            logged = any(f"key {key})" in line and ".tar" in line for line in lines)
            outs[kind].record(logged and key not in delivered, why=f"{key} ({kind}) not skipped/logged: {lines[-3:]}")
        lost = len({k for _, k in members} - set(delivered))
        dup = len(delivered) - len(set(delivered))
        if skipped != len(bad) or lost or dup:
            outs["garbage moments.npy"].failures.append(f"trial {t}: skipped {skipped} of {len(bad)} injected, "
                                                      f"{lost} good lost, {dup} duplicated")
            outs["garbage moments.npy"].data_lost += lost + dup
    for o in outs.values():
        o.note = "0 good samples lost" if not o.data_lost else f"{o.data_lost} good samples lost"
    return list(outs.values())


def _png(side: int, mode: str = "RGB") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, (side, side)).save(buf, format="png")  # 1-bit: a 12000² png is a few kB on disk
    return buf.getvalue()


def pixel_faults(work: Path, per_kind: int = 2) -> list[Outcome]:
    """``png`` members over PIL's decompression-bomb bound in shards read with ``pixels`` (REPA): each is a
    corrupt sample (skipped, counted, logged with shard and key), decoded never, warned about never."""
    import warnings

    from PIL import Image

    kinds = {"png of 12000² (PIL only warns)": 12000, "png of 20000² (PIL refuses)": 20000}
    outs = {k: Outcome("data", f"ImageNet latent shard: {k}", "skipped, counted, logged with shard and key; "
                       "no DecompressionBombWarning") for k in kinds}
    folder = work / "latent_pixels"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    small = _png(16)
    members = [(f"g{i:04d}", small) for i in range(8)]
    bad = [(kind, f"b{100 * n + j:04d}", _png(side, "1")) for n, (kind, side) in enumerate(kinds.items())
           for j in range(per_kind)]
    with wds.TarWriter(str(folder / "imagenet-000000.tar")) as sink:
        for key, png in members[:1] + sorted(members[1:] + [(key, png) for _, key, png in bad]):
            good = np.random.default_rng(int(key[1:])).standard_normal(SHAPE).astype(np.float16)
            sink.write({"__key__": key, "moments.npy": _npy(good), "cls": key[1:].encode(), "png": png})
    (folder / "imagenet-000000.json").write_text(json.dumps({"samples": len(members) + len(bad), "skipped": []}))
    with Timer(outs[next(iter(kinds))]), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seen, skipped, lines = _read_epoch(folder, 0, pixels=True)
    bombs = [str(w.message) for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    lost = len({k for k, _ in members} - set(seen))
    for kind, key, _ in bad:
        logged = any(f"key {key}): ValueError: image {key}.png is too large" in line for line in lines)
        outs[kind].record(logged and key not in seen and not bombs and not lost and skipped == len(bad),
                          why=f"{key} ({kind}): skipped {skipped} of {len(bad)}, {lost} good lost, "
                                         f"warnings {bombs[:1]}: {lines[-3:]}")
    outs[next(iter(kinds))].data_lost += lost
    for o in outs.values():
        o.note = f"{per_kind} per shard among {len(members)} good (pixels=True); {lost} good samples lost"
    return list(outs.values())


def shard_faults(work: Path) -> list[Outcome]:
    """A tar cut in the middle and a garbage shard (half the data unreadable)."""
    truncated = Outcome("data", "ImageNet latent shard cut in the middle (item 1)",
                        "the samples after the cut counted from the report; shard named")
    unreadable = Outcome("data", "half the ImageNet latent shards unreadable (item 3)",
                         "each lost shard counts all its samples, named in the log")
    folder = work / "latent_whole"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for s in range(4):
        _write_shard(folder / f"imagenet-{s:06d}.tar", [("good", f"g{100 * s + i:04d}") for i in range(10)])
    cut = folder / "imagenet-000001.tar"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2 + 100])
    with Timer(truncated):
        seen, skipped, lines = _read_epoch(folder, 0)
    named = any("imagenet-000001.tar" in line for line in lines)
    truncated.record(named and skipped == 10 - (len(seen) - 30) and len(seen) >= 30,
                     why=f"delivered {len(seen)}, skipped {skipped}: {lines}")
    truncated.note = f"{len(seen) - 30} samples before the cut kept, {skipped} counted lost"
    for s in (2, 3):
        (folder / f"imagenet-{s:06d}.tar").write_bytes(random.Random(s).randbytes(20000))
    cut.unlink()
    (folder / "imagenet-000001.json").unlink()
    with Timer(unreadable):
        seen, skipped, lines = _read_epoch(folder, 0)
    for s in (2, 3):
        unreadable.record(any(f"imagenet-{s:06d}.tar" in line for line in lines) and skipped == 20 and len(seen) == 10,
                          why=f"shard {s}: delivered {len(seen)}, skipped {skipped}: {lines}")
    unreadable.note = f"skipped={skipped} for 2 lost shards of 10 samples each; {len(seen)}/10 good delivered"
    return [truncated, unreadable]


def run_all(work: Path | None = None) -> list[Outcome]:
    import torch

    work = Path(work or ROOT / "runs" / "reliability" / "latent_shards")
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    return [*member_faults(work), *pixel_faults(work), *shard_faults(work)]
