"""``selfflow prepare rt1``: RT-1 TFRecord shards → webdataset shards, one sample per episode.

Layout of the output directory::

    train/rt1-00000.tar …   val/rt1-00000.tar …   reports/00000.json …   stats.json   manifest.json

A sample (key ``fractal_{shard:05d}_{idx:03d}``) holds the original JPEGs ``f0000.jpg … fNNNN.jpg`` (no
re-encode), ``actions.npy`` (T×7 float32, raw units, relative gripper), ``proprio.npy`` (T×8, when
present), ``instruction.txt`` and ``meta.json`` (source shard, index, SHA-256 of the record). The split is
a hash of the key, so an episode's split never depends on which shards were converted or in what order;
``manifest.json`` freezes it with the kept and rejected counts. ``stats.json`` holds the statistics of
the *training* episodes' raw actions (:class:`~selfflow.robotics.normalize.ActionStats`).

Source shard ``n`` — the number in its name (``…tfrecord-00042-of-01024``: 42), or its place in sorted order
when the names carry no distinct 5-digit numbers — becomes ``train/rt1-{n:05d}.tar`` and ``val/rt1-{n:05d}.tar``
(written under a temporary name, then renamed) and ``reports/{n:05d}.json`` (+ its training actions), written
last: a rerun skips converted shards (whichever subset of the files an earlier run saw), and ranks (RANK /
WORLD_SIZE, e.g. under torchrun) take every ``world``-th file. Whichever rank finds every report present merges
them into ``stats.json`` and ``manifest.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import webdataset as wds
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from selfflow.core.data.shard_format import npy_bytes
from selfflow.core.data.shard_writer import write_json
from selfflow.core.settings_record import changed_settings

from .fractal import Episode, read_episodes
from .normalize import ActionStats

log = logging.getLogger("selfflow.robotics")


class PrepareRT1Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: str = Field(description="directory of fractal20220817_data-train.tfrecord-* files (or one file)")
    out: str = Field(description="output directory")
    val_fraction: float = Field(0.03, ge=0, lt=1, description="episodes in the validation split (by key hash)")
    min_steps: int = Field(1, ge=1, description="drop shorter episodes (counted in the manifest)")
    max_shards: int | None = Field(None, ge=1, description="convert only the first N source shards (smoke runs)")
    rank: int = Field(default_factory=lambda: int(os.environ.get("RANK", "0")), ge=0)
    world_size: int = Field(default_factory=lambda: int(os.environ.get("WORLD_SIZE", "1")), ge=1)
    progress: bool = Field(False, description="a progress bar over this rank's source shards")


def name_number(name: str) -> int | None:
    """The shard number in a source file's name: its first 5-digit field (``…tfrecord-00042-of-01024``: 42)."""
    digits = [p for p in name.replace(".", "-").split("-") if p.isdigit() and len(p) == 5]
    return int(digits[0]) if digits else None


def shard_numbers(files: list[Path]) -> list[int]:
    """Each file's shard number: the one in its name, or — when a name has none or two names share one, which
    would give two episodes one key — its place in the sorted list (logged)."""
    numbers = [name_number(f.name) for f in files]
    if None in numbers or len(set(numbers)) < len(numbers):
        log.warning("the files of %s do not all carry a distinct 5-digit shard number (as fractal's "
                    "…tfrecord-00042-of-01024): numbered by their sorted order instead", files[0].parent)
        return list(range(len(files)))
    return numbers  # type: ignore[return-value]


def episode_key(shard: int, index: int) -> str:
    """``fractal_{shard:05d}_{idx:03d}``: the source shard's number and the episode's index in it."""
    return f"fractal_{shard:05d}_{index:03d}"


def is_validation(key: str, fraction: float) -> bool:
    """Deterministic episode-level split: the first 8 bytes of SHA-256(key) as a fraction of 2^64."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64 < fraction


def episode_sample(key: str, ep: Episode) -> dict:
    """An episode → webdataset members (see the module docstring)."""
    sample = {"__key__": key, "actions.npy": npy_bytes(ep.actions, np.float32),
              "instruction.txt": ep.instruction, "meta.json": json.dumps({**ep.meta, "key": key})}
    if ep.proprio is not None:
        sample["proprio.npy"] = npy_bytes(ep.proprio, np.float32)
    for k, jpg in enumerate(ep.frames):
        sample[f"f{k:04d}.jpg"] = bytes(jpg)
    return sample


def tfrecord_files(source: str | Path) -> list[Path]:
    src = Path(source)
    if not src.exists():
        raise FileNotFoundError(f"no such file or folder: {src} (--input: the fractal20220817_data TFRecords)")
    files = [src] if src.is_file() else sorted(p for p in src.glob("*.tfrecord*") if p.is_file())
    if not files:
        raise FileNotFoundError(f"no *.tfrecord* files in {src} (expected fractal20220817_data-train."
                                "tfrecord-XXXXX-of-01024 from gs://gresearch/robotics/fractal20220817_data/0.1.0)")
    return files


def convert_shard(path: Path, number: int, out: Path, o: PrepareRT1Options) -> dict:
    """One source shard → its train/val tars and ``reports/{number:05d}.json`` (see the module docstring)."""
    errors: list[dict] = []
    report = {"source": path.name, "episodes": {"train": [], "val": []}, "steps": {"train": 0, "val": 0},
              "rejected": errors, "too_short": 0}
    train_actions = []
    tmp = {s: out / s / f"rt1-{number:05d}.tar.{os.getpid()}.tmp" for s in ("train", "val")}
    writers = {s: wds.TarWriter(str(t)) for s, t in tmp.items()}
    try:
        for ep in read_episodes(path, errors):
            if ep.length < o.min_steps:
                report["too_short"] += 1
                continue
            key = episode_key(number, ep.meta["index"])
            split = "val" if is_validation(key, o.val_fraction) else "train"
            writers[split].write(episode_sample(key, ep))
            report["episodes"][split].append(key)
            report["steps"][split] += ep.length
            if split == "train":
                train_actions.append(ep.actions)
    finally:
        for w in writers.values():
            w.close()
    for split, t in tmp.items():
        if report["episodes"][split]:
            t.replace(out / split / f"rt1-{number:05d}.tar")
        else:
            t.unlink()
    for e in errors:
        if e.get("rest_of_file"):
            log.warning("rejected %s from record %d on (the rest of the file, unread): %s", Path(e["source"]).name,
                        e["index"], e["error"])
        else:  # the error names its record already
            log.warning("rejected %s", e["error"])
    actions = np.concatenate(train_actions) if train_actions else np.zeros((0, 7), np.float32)
    np.save(out / "reports" / f"{number:05d}.train_actions.npy", actions)
    write_json(out / "reports" / f"{number:05d}.json", report)
    return report


def merge_reports(out: Path, numbers: list[int], options: PrepareRT1Options) -> dict:
    """Every shard report → ``stats.json`` (training actions) and ``manifest.json`` (split, counts)."""
    reports = [json.loads((out / "reports" / f"{n:05d}.json").read_text()) for n in numbers]
    actions = np.concatenate([np.load(out / "reports" / f"{n:05d}.train_actions.npy") for n in numbers])
    if not len(actions):
        raise ValueError(f"no training episode was kept from {options.input} "
                         f"({sum(len(r['rejected']) for r in reports)} rejected)")
    write_json(out / "stats.json", ActionStats.compute(actions).model_dump())
    split = {s: [k for r in reports for k in r["episodes"][s]] for s in ("train", "val")}
    manifest = {"dataset": "fractal20220817_data",
                "options": options.model_dump(exclude={"rank", "world_size"}),
                "episodes": {s: len(k) for s, k in split.items()},
                "steps": {s: sum(r["steps"][s] for r in reports) for s in ("train", "val")},
                "rejected": [e for r in reports for e in r["rejected"]],
                "too_short": sum(r["too_short"] for r in reports), "split": split,
                "action_layout": "world_vector(3) rotation_delta(3) gripper_closedness_action(1), raw units"}
    write_json(out / "manifest.json", manifest)
    return manifest


def prepare_rt1(options: PrepareRT1Options | dict) -> dict:
    """Convert this rank's shards (skipping finished ones); returns the manifest once every shard is
    done, else ``{"pending": [shard numbers]}``."""
    o = PrepareRT1Options.model_validate(options)
    out = Path(o.out)
    files = tfrecord_files(o.input)[: o.max_shards]  # before anything is written: a wrong --input leaves nothing
    for sub in ("train", "val", "reports"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    check_conversion_options(out, o)
    numbers = shard_numbers(files)
    check_report_sources(out, files, numbers)
    mine = [(files[i], numbers[i]) for i in range(o.rank, len(files), o.world_size)
            if not (out / "reports" / f"{numbers[i]:05d}.json").is_file()]
    for path, n in tqdm(mine, desc=f"rt1 shards (rank {o.rank})", unit="shard", disable=not o.progress or None):
        convert_shard(path, n, out, o)
    pending = [n for n in numbers if not (out / "reports" / f"{n:05d}.json").is_file()]
    if pending:
        return {"pending": pending}
    # every converted shard, also those of an earlier run with a larger --max-shards: training reads them all
    done = {int(r.stem) for r in (out / "reports").glob("*.json") if r.stem.isdigit()}
    return merge_reports(out, sorted(done | set(numbers)), o)


def check_report_sources(out: Path, files: list[Path], numbers: list[int]) -> None:
    """Refuse a rerun whose shard ``n`` is another file than the one converted as ``n`` (files numbered by their
    order, then some added or removed): it would skip a file and count another twice."""
    for path, n in zip(files, numbers, strict=True):
        report = out / "reports" / f"{n:05d}.json"
        if report.is_file() and (was := json.loads(report.read_text()).get("source")) not in (None, path.name):
            raise ValueError(f"{report} was converted from {was}, but shard {n} of the input is now {path.name}: "
                             "the input's files changed since; restore them or prepare into a new directory")


CONTENT_OPTIONS = ("val_fraction", "min_steps")  # what decides a shard's split and episodes


def check_conversion_options(out: Path, o: PrepareRT1Options) -> None:
    """Record (first run) or check (rerun) the options a shard's content depends on: finished shards are
    skipped on a rerun, so other options would leave shards converted two ways under one manifest."""
    path = out / "reports" / "options.json"
    want = {k: getattr(o, k) for k in CONTENT_OPTIONS}
    if changed := changed_settings(path, want):
        raise ValueError(f"{out} holds shards converted with other options ({'; '.join(changed)}): "
                         "give the same options to finish it, or prepare into a new directory")
    if not path.is_file() and not any((out / "reports").glob("[0-9]*.json")):  # fresh (older ones: unchecked)
        write_json(path, want)
