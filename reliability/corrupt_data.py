"""Data faults: corrupt media files at ``prepare`` time, corrupt shard members at training time.

1. *Media* (JPEG, PNG, MP4, WAV, FLAC — truncated, garbage, empty, header only) go through the project's
   readers (PIL, :func:`selfflow.video.video_io.read_frames`, :func:`selfflow.audio.audio_io.read_audio`)
   inside :func:`selfflow.text.shards.write_shards`, as every ``selfflow prepare`` target does: each bad
   file must be skipped and listed in its shard's report, every good file must reach the shards.
2. *Shard members* (truncated / garbage ``.npy``, missing ``latent.npy``, wrong shape, wrong dtype,
   non-finite values, bad embedding, empty member) are read by :class:`LatentShardStream`: each must be
   skipped, counted and logged with its shard and key, every good sample delivered exactly once.
3. *A training run* (the tiny RT-1 config on its shards, with corrupted JPEG frames and action arrays) must
   finish with the count in ``metrics.jsonl``; with too many bad episodes it must stop on
   ``train.max_bad_data_fraction`` (exit status 3, a message, no traceback).
"""

from __future__ import annotations

import io
import json
import logging
import random
import shutil
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds

from .common import ROOT, Outcome, Timer, run

MEDIA_FAULTS = ("truncated", "garbage", "empty", "header_only")


def _corrupt(data: bytes, fault: str, rng: random.Random) -> bytes:
    if fault == "truncated":
        return data[: int(len(data) * rng.uniform(0.2, 0.6))]
    if fault == "garbage":
        return bytes(rng.randrange(256) for _ in range(len(data)))
    if fault == "empty":
        return b""
    return data[:32]  # header only


def _write_media(folder: Path, fmt: str, i: int) -> Path:
    """One small valid file of ``fmt``."""
    rng = np.random.default_rng(i)
    path = folder / f"good_{i:03d}.{fmt}"
    if fmt in ("jpg", "png"):
        from PIL import Image

        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(path)
    elif fmt in ("wav", "flac"):
        import soundfile as sf

        sf.write(path, rng.uniform(-0.5, 0.5, (4000, 2)).astype(np.float32), 8000)
    else:
        import av

        with av.open(str(path), "w") as out:
            stream = out.add_stream("mpeg4", rate=8)
            stream.width = stream.height = 32
            stream.pix_fmt = "yuv420p"
            for _ in range(6):
                frame = av.VideoFrame.from_ndarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), format="rgb24")
                out.mux(stream.encode(frame))
            out.mux(stream.encode(None))
    return path


def _read_media(path: Path) -> dict[str, Any]:
    """Decode with the project's readers into a small fixed-shape 'latent'."""
    fmt = path.suffix[1:]
    if fmt in ("jpg", "png"):
        from PIL import Image

        img = Image.open(path).convert("RGB").resize((8, 8))
        latent = np.asarray(img, np.float32).transpose(2, 0, 1) / 255
    elif fmt in ("wav", "flac"):
        from selfflow.audio.audio_io import fit_length, read_audio

        latent = fit_length(read_audio(path, 8000, 2, 0.0, 0.25), 2000).numpy()[:, ::250]
    else:
        from selfflow.video.video_io import read_frames

        latent = read_frames(path, [0, 1, 2, 3]).astype(np.float32).mean(-1)[:, ::4, ::4] / 255
    return {"latent": latent, "caption": path.name}


def media_faults(work: Path, per_kind: int = 2, seed: int = 0) -> list[Outcome]:
    from selfflow.core.data.shard_writer import write_shards

    rng = random.Random(seed)
    outs = []
    for fmt in ("jpg", "png", "mp4", "wav", "flac"):
        out = Outcome("data", f"corrupt {fmt.upper()} file at prepare", "skipped, counted, named in the shard report")
        folder = work / f"media_{fmt}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        with Timer(out):
            good = [_write_media(folder, fmt, i) for i in range(3)]
            bad = []
            for fault in MEDIA_FAULTS:
                for k in range(per_kind):
                    p = folder / f"bad_{fault}_{k}.{fmt}"
                    p.write_bytes(_corrupt(good[k % len(good)].read_bytes(), fault, rng))
                    bad.append(p)
            items = sorted(good + bad)
            shards = folder / "shards"
            report = write_shards(items, _read_media, shards, prefix=fmt, shard_size=5, key=lambda p: p.name)
            failed = {f["item"] for r in shards.glob(f"{fmt}-*.json") for f in json.loads(r.read_text())["skipped"]}
            written = {s["txt"].decode() for s in wds.WebDataset([str(p) for p in sorted(shards.glob("*.tar"))],
                                                                   shardshuffle=False, empty_check=False)}
        # A bad file is skipped and listed in the report, or (a truncated WAV) decoded from its readable part.
        tolerated = [p.name for p in bad if p.name in written]
        for p in bad:
            out.record((p.name in failed) != (p.name in written), why=f"{p.name} neither skipped nor decoded")
        lost = len({p.name for p in good} - written)
        out.data_lost += lost
        if report["skipped"] != len(bad) - len(tolerated) or lost:
            out.failures.append(f"report {report}, {lost} good files missing")
        out.note = (f"{len(bad) - len(tolerated)} skipped and reported"
                    + (f", {len(tolerated)} decoded from their readable part" if tolerated else "")
                    + f"; {len(good) - lost}/{len(good)} good files kept")
        outs.append(out)
    return outs


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


MEMBER_FAULTS: dict[str, Any] = {
    "truncated npy": lambda good: {"latent.npy": _npy(good)[:-7]},
    "garbage npy": lambda good: {"latent.npy": b"\x93NUMPY garbage" * 3},
    "empty member": lambda good: {"latent.npy": b""},
    "missing latent.npy": lambda good: {"emb.npy": _npy(np.ones((2, 4), np.float16))},
    "wrong shape": lambda good: {"latent.npy": _npy(good.reshape(good.shape[0], -1))},
    "wrong dtype": lambda good: {"latent.npy": _npy(good.astype(np.int32))},
    "non-finite values": lambda good: {"latent.npy": _npy(np.full_like(good, np.nan))},
    "bad embedding": lambda good: {"latent.npy": _npy(good), "emb.npy": _npy(np.ones(4, np.float16))},
}


def shard_member_faults(work: Path, trials: int = 3, per_kind: int = 5, seed: int = 0) -> list[Outcome]:
    """Shards mixing good samples and ``per_kind`` bad members of every kind, read for one epoch."""
    from selfflow.core.data.shard_format import collate_samples, shard_urls
    from selfflow.core.data.shard_stream import ShardStream

    outs = {k: Outcome("data", f"shard member: {k}", "skipped, counted, logged with shard and key")
            for k in MEMBER_FAULTS}
    rng = random.Random(seed)
    for t in range(trials):
        folder = work / f"shards_{t}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        members = [("good", f"g{i:03d}") for i in range(40)]
        members += [(kind, f"b{t}-{j:03d}") for j, kind in enumerate(k for k in MEMBER_FAULTS for _ in range(per_kind))]
        rng.shuffle(members)
        shape = (4, 2, 3, 3)
        for s in range(4):
            with wds.TarWriter(str(folder / f"shard-{s:06d}.tar")) as sink:
                for kind, key in members[s::4]:
                    good = np.random.default_rng(len(key)).standard_normal(shape).astype(np.float16)
                    fields = {"latent.npy": _npy(good)} if kind == "good" else MEMBER_FAULTS[kind](good)
                    sink.write({"__key__": key, **fields, "txt": key})
        handler = _Capture()
        logging.getLogger("selfflow.shards").addHandler(handler)
        try:
            t0 = _now()
            stream = ShardStream(shard_urls(folder), 3, collate_samples, seed=t)
            it, seen = iter(stream), []
            while (batch := next(it)) and stream.epoch == 0:  # one epoch (the stream reads on into the next)
                seen += batch["captions"]
            elapsed = _now() - t0
        finally:
            logging.getLogger("selfflow.shards").removeHandler(handler)
        good_keys = sorted(k for kind, k in members if kind == "good")
        delivered = sorted(seen)
        # a partial last batch of the epoch is dropped by design (the next epoch reshuffles): not a loss
        lost = len(set(good_keys) - set(delivered)) - (len(good_keys) % 3)
        dup = len(delivered) - len(set(delivered))
        bad = [(kind, key) for kind, key in members if kind != "good"]
        for kind, key in bad:
            logged = any(f"key {key})" in line and ".tar" in line for line in handler.lines)
            outs[kind].record(logged and key not in delivered, why=f"{key} ({kind}) not skipped/logged")
            outs[kind].seconds += elapsed / len(bad)
        logged_keys = {line.split("key ", 1)[1].split(")")[0] for line in handler.lines if "key " in line}
        if not {k for _, k in bad} <= logged_keys or stream.skipped != len(handler.lines) or lost or dup:
            outs["truncated npy"].failures.append(f"trial {t}: skipped {stream.skipped}, {len(bad)} injected, "
                                                 f"{lost} good lost, {dup} duplicated")
            outs["truncated npy"].data_lost += max(0, lost) + dup
    for o in outs.values():
        o.note = "0 good samples lost" if not o.data_lost else f"{o.data_lost} good samples lost"
    return list(outs.values())


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _now() -> float:
    import time

    return time.perf_counter()


def _rewrite_tar(path: Path, edit: Any) -> None:
    """Rewrite a tar shard member by member through ``edit(name, data) → data | None`` (None: drop)."""
    with tarfile.open(path) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers() if m.isfile()]
    with tarfile.open(path, "w") as out:
        for m, data in members:
            new = edit(m.name, data)
            if new is None:
                continue
            m.size = len(new)
            out.addfile(m, io.BytesIO(new))


def training_run_faults(work: Path) -> list[Outcome]:
    """The tiny RT-1 run on episode shards with corrupted episodes: finishes (counting them) or, with too
    many, stops on ``train.max_bad_data_fraction``."""
    from selfflow.robotics.modality import make_fake_dataset

    out_ok = Outcome("data", "corrupt JPEG frame / actions.npy in a training run",
                     "run finishes, data_skipped in metrics.jsonl")
    out_abort = Outcome("data", "bad-data fraction above train.max_bad_data_fraction",
                        "run stops with a clear error (exit 3)")
    src = work / "rt1-fake"
    if not sorted(src.rglob("*.tar")):
        make_fake_dataset(src)
    shard_files = sorted(src.rglob("*.tar"))
    if not shard_files:
        raise FileNotFoundError(f"no episode shards in {src}")
    base = ["data.modality=rt1", "data.options.dataset=episode_shards", "data.options.frames=2",
            "data.options.chunk=4", "data.options.image_size=[16,16]", "data.options.patch=[1,8,8]",
            "data.options.conditioning=text", "train.batch_size=2", "checkpoint.every=0",
            "sample.every=0", "sample.num_samples=2"]
    for label, n_bad, limit, outcome in (("some", 2, "1.0", out_ok), ("many", 8, "0.05", out_abort)):
        data = work / f"rt1-{label}"
        shutil.rmtree(data, ignore_errors=True)
        shutil.copytree(src, data)
        bad_keys: list[str] = []

        def edit(name: str, blob: bytes, bad_keys: list[str] = bad_keys, n_bad: int = n_bad) -> bytes | None:
            key = name.split(".", 1)[0]
            if key not in bad_keys and len(bad_keys) < n_bad:
                bad_keys.append(key)
            if key in bad_keys:
                if name.endswith(".jpg") and len(bad_keys) % 2:
                    return blob[: len(blob) // 3]  # truncated JPEG
                if name.endswith("actions.npy") and not len(bad_keys) % 2:
                    return None  # a missing member
            return blob

        for shard in sorted(data.rglob("*.tar")):
            _rewrite_tar(shard, edit)
        shutil.rmtree(work / "runs" / f"rt1-{label}", ignore_errors=True)  # a fresh run, never a resumed one
        with Timer(outcome):
            proc = run(_train(work, f"rt1-{label}", base, data, limit, steps=40), timeout=900)
        metrics = work / "runs" / f"rt1-{label}" / "metrics.jsonl"
        if outcome is out_ok:
            recs = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.is_file() else []
            skipped = recs[-1].get("data_skipped", 0) if recs else 0
            ok = proc.returncode == 0 and skipped >= len(bad_keys) and recs[-1]["step"] == 40
            for _ in bad_keys:
                outcome.record(ok, crash=proc.returncode not in (0, 3),
                               why=f"exit {proc.returncode}, data_skipped {skipped}: {proc.stderr[-800:]}")
            outcome.note = f"{len(bad_keys)} bad episodes, data_skipped={skipped} after 40 steps"
        else:
            ok = proc.returncode == 3 and "max_bad_data_fraction" in proc.stderr and "Traceback" not in proc.stderr
            outcome.record(ok, crash="Traceback" in proc.stderr, why=f"exit {proc.returncode}: {proc.stderr[-800:]}")
            outcome.note = next((line for line in proc.stderr.splitlines() if "stopped" in line), "")[:160]
    return [out_ok, out_abort]


def _train(work: Path, name: str, base: list[str], data: Path, limit: str, steps: int) -> list[str]:
    from .common import train_cmd

    return train_cmd(work / "runs", name, *base, f"data.options.shards={data}", f"train.steps={steps}",
                     f"train.max_bad_data_fraction={limit}", image=False)


def run_all(work: Path | None = None) -> list[Outcome]:
    work = Path(work or ROOT / "runs" / "reliability" / "data")
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    return [*media_faults(work), *shard_member_faults(work), *training_run_faults(work)]
