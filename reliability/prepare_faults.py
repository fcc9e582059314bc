"""``selfflow prepare`` faults of issue #16 items 7 and 10, run through the real CLI.

- *Captions* that are not UTF-8 (Latin-1, UTF-16, random bytes) beside good images (``prepare
  image-text``): each item is skipped, counted and listed in its shard's report; every good image reaches
  the shards.
- *Over-large images* (12000² — PIL only warns — and 20000² PNGs): skipped, counted and listed with
  "too large", never decoded.
- *Damaged RT-1 TFRecords* (``prepare rt1``): a file cut mid-record, a file cut inside the first header, a
  flipped byte inside a record, a garbage file: the conversion finishes, the manifest's ``rejected`` names
  each file (and record), and every episode before the damage is kept.
- *A batch size* far above any real run: refused at validation (exit 2, the key named, no traceback).
"""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import webdataset as wds

from .common import ROOT, Outcome, Timer, run, train_cmd

CLI = [sys.executable, "-m", "selfflow.core.cli"]
BAD_CAPTIONS = {"latin1": "café crème".encode("latin-1"), "utf16": "a cat".encode("utf-16"),
                "random": bytes(random.Random(0).randrange(128, 256) for _ in range(40))}


def _png(path: Path, seed: int) -> None:
    from PIL import Image

    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(path)


def image_text_faults(work: Path, good: int = 4) -> list[Outcome]:
    """One ``prepare image-text`` over good images, non-UTF-8 captions and over-large images."""
    from PIL import Image

    captions = Outcome("data", "non-UTF-8 caption file at prepare (item 7)", "item skipped, counted, named")
    huge = Outcome("data", "over-large image (12000², 20000² PNG) at prepare (item 10)",
                   "skipped, counted, named 'too large'; never decoded")
    src, out = work / "captioned", work / "captioned-shards"
    shutil.rmtree(src, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    src.mkdir(parents=True)
    for i in range(good):
        _png(src / f"good{i}.png", i)
        (src / f"good{i}.txt").write_text(f"good caption {i} — ünïcode")
    for name, blob in BAD_CAPTIONS.items():
        _png(src / f"cap_{name}.png", 99)
        (src / f"cap_{name}.txt").write_bytes(blob)
    for side in (12000, 20000):
        Image.new("1", (side, side)).save(src / f"huge{side}.png")  # 1-bit: tiny on disk, not in RAM
    with Timer(captions):
        proc = run([*CLI, "prepare", "image-text", "--input", str(src), "--out", str(out), "--codec", "pixel",
                    "--image-size", "16", "--shard-size", "3"], timeout=600)
    skipped = {Path(s["item"]).name: s["error"] for r in out.glob("image-*.json")  # the shard reports
               for s in json.loads(r.read_text())["skipped"]}
    texts = {s["txt"].decode() for s in wds.WebDataset([str(p) for p in sorted(out.glob("*.tar"))],
                                                        shardshuffle=False, empty_check=False)}
    crash = "Traceback" in proc.stderr
    why = f"exit {proc.returncode}: {proc.stderr[-600:]}"
    for name in BAD_CAPTIONS:
        err = skipped.get(f"cap_{name}.png", "")
        captions.record(proc.returncode == 0 and f"cap_{name}.txt is not UTF-8" in err, crash=crash,
                        why=f"cap_{name}: {err or why}")
    for side in (12000, 20000):
        err = skipped.get(f"huge{side}.png", "")
        huge.record(proc.returncode == 0 and "too large" in err, crash=crash, why=f"huge{side}: {err or why}")
    kept = sum(f"good caption {i} — ünïcode" in texts for i in range(good))
    captions.data_lost = good - kept
    captions.note = (f"{sum(k.startswith('cap_') for k in skipped)} items skipped and listed; "
                     f"{kept}/{good} good images kept")
    huge.note = "listed as 'too large to decode' with PIL's pixel count and limit"
    return [captions, huge]


def _damage(path: Path, kind: str) -> None:
    from selfflow.robotics.fractal import tfrecord_frames

    data = bytearray(path.read_bytes())
    starts, at = [], 0
    for record, _ in tfrecord_frames(path):
        starts.append(at)
        at += 16 + len(record)
    if kind == "cut mid-record":
        data = data[: starts[2] + 60]
    elif kind == "cut in the first header":
        data = data[:10]
    elif kind == "flipped byte":
        data[starts[1] + 200] ^= 0xFF
    else:  # garbage
        data = bytearray(random.Random(1).randrange(256) for _ in range(len(data)))
    path.write_bytes(bytes(data))


# damage kind → intact episodes (of 3) before or around the damage that must be kept
TFRECORD_FAULTS = {"cut mid-record": 2, "cut in the first header": 0, "flipped byte": 2, "garbage": 0}


def tfrecord_faults(work: Path) -> Outcome:
    """``prepare rt1`` over good shards and one shard of each damage kind."""
    from selfflow.robotics.fractal import write_fake_shards

    out = Outcome("data", "corrupt / truncated RT-1 TFRecord at prepare rt1 (item 7)",
                  "conversion finishes; the file (and record) named and counted in manifest.json")
    src, dst = work / "tfrecords", work / "rt1-prepared"
    shutil.rmtree(src, ignore_errors=True)
    shutil.rmtree(dst, ignore_errors=True)
    n = 2 + len(TFRECORD_FAULTS)
    paths = write_fake_shards(src, shards=n, episodes_per_shard=3, steps=(3, 5), size=(16, 16))
    damaged = dict(zip(TFRECORD_FAULTS, paths[2:]))
    for kind, path in damaged.items():
        _damage(path, kind)
    with Timer(out):
        proc = run([*CLI, "prepare", "rt1", "--input", str(src), "--out", str(dst), "--val-fraction", "0"])
    manifest = json.loads((dst / "manifest.json").read_text()) if (dst / "manifest.json").is_file() else {}
    rejected = {Path(e["source"]).name: e for e in manifest.get("rejected", [])}
    for kind, path in damaged.items():
        named = path.name in rejected and path.name in proc.stderr
        out.record(proc.returncode == 0 and named, crash="Traceback" in proc.stderr,
                   why=f"{kind}: exit {proc.returncode}, rejected {sorted(rejected)}: {proc.stderr[-500:]}")
    want = 3 * 2 + sum(TFRECORD_FAULTS.values())
    got = manifest.get("episodes", {}).get("train", 0)
    out.data_lost = max(0, want - got)
    out.note = f"{len(rejected)} damaged files rejected and named; {got}/{want} intact episodes kept"
    return out


def batch_size_bound(work: Path) -> Outcome:
    out = Outcome("data", "absurd train.batch_size (item 10)", "refused: exit 2 naming train.batch_size")
    for value in ("10000000", "65537"):
        with Timer(out):
            proc = run(train_cmd(work / "runs", "huge-batch", f"train.batch_size={value}"), timeout=300)
        out.record(proc.returncode == 2 and "train.batch_size" in proc.stderr and "Traceback" not in proc.stderr,
                   crash="Traceback" in proc.stderr, why=f"{value}: exit {proc.returncode}: {proc.stderr[-400:]}")
    out.note = "limit 65536 per rank (config.MAX_BATCH_SIZE)"
    return out


def run_all(work: Path | None = None) -> list[Outcome]:
    work = Path(work or ROOT / "runs" / "reliability" / "prepare")
    work.mkdir(parents=True, exist_ok=True)
    return [*image_text_faults(work), tfrecord_faults(work), batch_size_bound(work)]
