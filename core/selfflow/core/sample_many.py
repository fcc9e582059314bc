"""``selfflow sample --num N``: many samples for evaluation, sharded over ``torchrun`` ranks, resumable.

The index space ``0 … N−1`` is cut into fixed batches ``j = [j·B, (j+1)·B)``; the unfinished ones are dealt
round-robin to the ranks. A sample's label, initial noise and (SDE) Brownian increments come from its own
generator, seeded by ``(seed, index)``, and a batch always holds the same indices — so the samples are
bit-identical on any number of ranks and across restarts. Each finished batch leaves its per-sample files (PNG …,
written atomically) and then a part file ``parts/batch_XXXXXX.npy`` with its evaluation array; a batch with a part
file is done and skipped on restart (a ``parts/batch_XXXXXX.json`` beside it, written first, names the batch's
files, labels and prompts). ``parts/settings.json`` records what fixes the samples (count, batching, seed, labels,
sampler, prompts, modality, a digest of the weights); a restart with other settings is refused, naming them,
instead of mixing two runs' samples — except a larger count, which extends the run (its finished batches are kept;
a last batch cut short by the old count is redone). Rank 0 finally concatenates the parts into ``samples_N.npz``
(``arr_0``, the ADM evaluator's format; ``arr_1`` the class labels of class-conditional runs; ``prompts`` those of
text-conditioned runs) and, for text-conditioned runs, writes ``prompts.jsonl`` (each sample's file and prompt,
what ``selfflow eval`` pairs samples with). The output directory must be shared by the ranks.

Sample ``i`` of a text-conditioned run gets ``prompts[i mod P]``: the given prompts, else the modality's
sample captions.

``official_repro`` swaps this layout for the official ``sample.py``'s (:mod:`.official_repro`): batches seeded
per (rank, batch) of an official run on ``official_world_size`` GPUs, the global generator, bf16 autocast and
truncation to uint8 — still resumable, and still the same on any number of our ranks.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from tqdm import tqdm

from .atomic import atomic_write_text
from .config import ConfigError
from .distributed import DistInfo, barrier
from .generate import conditions_for, require_prompts, sample_generator, seeded_noise
from .modality import Modality, preview_conditions
from .official_repro import SeededBatch, official_batches, official_generate_batch
from .precision import autocast
from .prompts import write_prompt_records
from .sampler import SamplerConfig, sample
from .settings_record import changed_settings
from .tokens import Conditioning


class SampleManyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num: int = Field(50_000, ge=1)
    batch_size: int = Field(64, ge=1, description="per forward; fixes which indices share a batch")
    seed: int = 0
    labels: Literal["random", "balanced"] = Field("random", description="balanced: label = index mod classes")
    png: bool = Field(True, description="write one file per sample (PNG for images)")
    npz: bool = Field(True, description="write samples_N.npz (arr_0) when the modality has an array format")
    out_dir: Path
    official_repro: bool = Field(False, description="the official sample.py's seeds, bf16 and uint8 truncation")
    official_world_size: int | None = Field(None, ge=1, description="official_repro: GPUs of the official run "
                                            "being reproduced (None: this run's ranks)")
    prompts: list[str] | None = Field(None, min_length=1, description="text-conditioned runs: sample i gets "
                                      "prompts[i mod P] (None: the modality's sample captions)")


def part_path(out_dir: Path, batch: int) -> Path:
    return out_dir / "parts" / f"batch_{batch:06d}.npy"


def meta_path(out_dir: Path, batch: int) -> Path:
    """The batch's files, labels and prompts (JSON), written before its part file."""
    return part_path(out_dir, batch).with_suffix(".json")


def staging_dir(out_dir: Path, rank: int) -> Path:
    """Where a rank writes a batch's files before moving them into ``out_dir`` (cleared on every start)."""
    return out_dir / "parts" / f"staging-rank{rank}"


def weights_digest(model: nn.Module) -> str:
    """A digest of the model's state dict (names, dtypes, shapes and bytes): same weights, same digest."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def run_settings(model: nn.Module, modality: Modality, sampler: SamplerConfig, opts: SampleManyConfig,
                 world_size: int, prompts: list[str] | None) -> dict:
    """Everything that decides which samples land in the parts — what a restart must repeat."""
    return {"num": opts.num, "batch_size": opts.batch_size, "seed": opts.seed, "labels": opts.labels,
            "png": opts.png, "official_repro": opts.official_repro,
            "official_world_size": (opts.official_world_size or world_size) if opts.official_repro else None,
            "modality": modality.name, "sampler": sampler.model_dump(mode="json"),
            "prompts": None if prompts is None else hashlib.sha256(json.dumps(prompts).encode()).hexdigest(),
            "weights": weights_digest(model)}


def check_settings(out: Path, settings: dict) -> int | None:
    """Raise ``ConfigError`` when ``out`` holds samples made with other settings. A larger ``num`` is not another
    setting in our per-index layout: batch ``j`` still holds indices ``[j·B, (j+1)·B)`` with the same seeds, so
    the run is extended. Returns the recorded ``num`` when it grows (``None`` otherwise). The official layout
    seeds its batches by rank, so there every ``num`` is a run of its own."""
    path = out / "parts" / "settings.json"
    then = json.loads(path.read_text()).get("num") if path.is_file() else None
    grows = isinstance(then, int) and settings["num"] > then and not settings["official_repro"]
    if changed := changed_settings(path, {**settings, "num": then} if grows else settings):
        raise ConfigError(f"{out} holds samples made with other settings ({'; '.join(changed)}), recorded in "
                          f"{path}: give another --out-dir, or delete {out} to start over")
    return then if grows else None


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@torch.no_grad()
def generate_batch(model: nn.Module, modality: Modality, sampler: SamplerConfig, indices: list[int], seed: int,
                   label_mode: str, device: torch.device, prompts: list[str] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Decoded media and labels for ``indices``; every random number comes from the samples' generators.
    ``prompts``: sample ``i`` gets ``prompts[i mod P]``."""
    gens = [sample_generator(seed, i) for i in indices]
    n = len(indices)
    labels = None
    if modality.num_classes:
        k = modality.num_classes
        labels = torch.tensor([i % k if label_mode == "balanced" else int(torch.randint(k, (1,), generator=g))
                               for i, g in zip(indices, gens)], device=device)
        cond = Conditioning(labels=labels)
        null = Conditioning(labels=torch.full_like(labels, k))
    elif prompts is not None:
        cond, null, _ = conditions_for(modality, n, device, prompts=[prompts[i % len(prompts)] for i in indices])
    else:
        cond, null, _ = preview_conditions(modality, torch.as_tensor(indices), device)
    ids = modality.sample_ids(n, device)
    noise = seeded_noise(gens, ids.shape[1], modality.token_channels)
    x = sample(model, noise.to(device), ids, cond, sampler, null, modality.name, generator=gens)
    with autocast(sampler.precision, device):
        return modality.decode(x.float()), labels


def plan_batches(opts: SampleManyConfig, world_size: int) -> list[SeededBatch]:
    """Every batch of the run in ``samples_N.npz`` order."""
    if opts.official_repro:
        return official_batches(opts.num, opts.batch_size, opts.official_world_size or world_size, opts.seed)
    return [SeededBatch(list(range(lo, min(lo + opts.batch_size, opts.num))), opts.seed)
            for lo in range(0, opts.num, opts.batch_size)]


def _generate_and_write(model: nn.Module, modality: Modality, sampler: SamplerConfig, indices: list[int],
                        opts: SampleManyConfig, prompts: list[str] | None, device: torch.device, out: Path,
                        staging: Path) -> tuple[np.ndarray | None, list[str | None], torch.Tensor | None]:
    """Our default batch: per-index seeds, the modality's files (written in ``staging``, then moved into
    ``out``); returns the evaluation array, the file names (``None`` without ``png``) and the labels."""
    media, labels = generate_batch(model, modality, sampler, indices, opts.seed, opts.labels, device, prompts)
    files: list[str | None] = [None] * len(indices)
    if opts.png:
        staging.mkdir(parents=True, exist_ok=True)
        for k, i in enumerate(indices):
            label = None if labels is None else int(labels[k])
            written = modality.write_sample(media[k], label, staging / f"{i:06d}")
            os.replace(written, out / written.name)
            files[k] = written.name
        shutil.rmtree(staging)  # and whatever else a modality's writer put beside the sample
    return modality.evaluation_array(media), files, labels


def _write_images(rows: np.ndarray, indices: list[int], out: Path) -> None:
    """The official mode's per-sample PNGs: exactly the (truncated) rows of the ``.npz``."""
    from PIL import Image

    for row, i in zip(rows, indices):
        tmp = out / f"{i:06d}.tmp.png"
        Image.fromarray(row).save(tmp)
        os.replace(tmp, out / f"{i:06d}.png")


def sample_many(model: nn.Module, modality: Modality, sampler: SamplerConfig, opts: SampleManyConfig,
                dist: DistInfo, progress: bool = True) -> Path | None:
    """Generate ``opts.num`` samples into ``opts.out_dir``; returns the ``.npz`` path on rank 0 (else None)."""
    if opts.prompts is not None:
        require_prompts(modality)
    if opts.labels == "balanced" and not modality.num_classes:
        raise ConfigError(f"--labels balanced spreads the samples over the classes, but {modality.name!r} samples "
                          "have none (a text-conditioned or unconditional run)")
    if not opts.png and type(modality).evaluation_array is Modality.evaluation_array:
        raise ConfigError(f"--no-png: {modality.name!r} samples have no array format (samples_N.npz holds images), "
                          "so nothing would be written; keep the per-sample files")
    prompts = opts.prompts
    if prompts is None and not modality.num_classes and modality.context_dim:
        prompts = modality.class_names or None  # a text-conditioned modality's sample captions
    out = Path(opts.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = run_settings(model, modality, sampler, opts, dist.world_size, prompts)
    grown_from = check_settings(out, settings)  # every rank reads the same record, so every rank stops alike
    batches = plan_batches(opts, dist.world_size)
    n_batches = len(batches)
    # extending a run whose last batch was cut short at the old num: that batch now holds more indices
    short = grown_from // opts.batch_size if grown_from is not None and grown_from % opts.batch_size else None
    remaining = [j for j in range(n_batches) if j == short or not part_path(out, j).is_file()]
    if dist.is_main:  # a killed run's half-written batches, whatever its number of ranks
        for stale in (out / "parts").glob("staging-rank*"):
            shutil.rmtree(stale)
        if grown_from is not None:
            if short is not None:  # before the record says the new num: a rerun after a kill redoes it too
                part_path(out, short).unlink(missing_ok=True)
                meta_path(out, short).unlink(missing_ok=True)
            print(f"selfflow: extending the {grown_from} samples in {out} to {opts.num}", file=sys.stderr)
        elif 0 < len(remaining) < n_batches:  # a killed or stopped run: said as a Ctrl-C'd one says it will be
            print(f"selfflow: resuming {out}: {n_batches - len(remaining)} of its {n_batches} batches are done",
                  file=sys.stderr)
        if opts.labels == "balanced" and opts.num % modality.num_classes:
            extra = opts.num % modality.num_classes
            print(f"note: --labels balanced with --num {opts.num} over {modality.num_classes} classes: classes "
                  f"0…{extra - 1} get one sample more than the others", file=sys.stderr)
    barrier()  # every rank has checked and listed the finished batches before any rank adds one
    if dist.is_main and (grown_from is not None or not (out / "parts" / "settings.json").is_file()):
        atomic_write_text(out / "parts" / "settings.json", json.dumps(settings, indent=1) + "\n")
    mine = remaining[dist.rank::dist.world_size]
    model.eval()
    bar = tqdm(total=opts.num, initial=max(0, opts.num - len(remaining) * opts.batch_size), unit="sample",
               disable=not (progress and dist.is_main), desc=f"sample on {dist.world_size} rank(s)",
               dynamic_ncols=True)
    with resume_note_on_interrupt(out, n_batches, dist.is_main):
        for j in mine:
            indices = batches[j].indices
            if opts.official_repro:
                array, labels = official_generate_batch(model, modality, sampler, batches[j], dist.device)
                kept = [i for i in indices if i < opts.num]  # the official last rank's overshoot is not kept
                files: list[str | None] = [f"{i:06d}.png" if opts.png else None for i in kept]
                if opts.png:
                    _write_images(array, kept, out)
            else:
                array, files, labels = _generate_and_write(model, modality, sampler, indices, opts, prompts,
                                                           dist.device, out, staging_dir(out, dist.rank))
            meta = {"files": files, "labels": None if labels is None else labels.tolist()[:len(files)],
                    "prompts": None if prompts is None else [prompts[i % len(prompts)] for i in indices]}
            atomic_write_text(meta_path(out, j), json.dumps(meta))
            _atomic_save_npy(part_path(out, j), np.zeros(0, np.uint8) if array is None else array)
            if delay := os.environ.get("SELFFLOW_FAULT_SAMPLE_DELAY"):  # kill/restart tests: slow each batch
                time.sleep(float(delay))
            bar.update(min(len(indices) * dist.world_size, bar.total - bar.n))
    bar.close()
    barrier()
    if not dist.is_main:
        return None
    npz = assemble(out, opts.num, n_batches, opts.npz)
    if grown_from is not None and npz is not None and (old := out / f"samples_{grown_from}.npz").is_file():
        old.unlink()  # its samples are the first of the new file: left beside it, it was easy to evaluate by mistake
        print(f"selfflow: removed {old.name} (its samples are the first {grown_from} of {npz.name})", file=sys.stderr)
    return npz


@contextlib.contextmanager
def resume_note_on_interrupt(out: Path, n_batches: int, is_main: bool) -> Iterator[None]:
    """On Ctrl-C, say (on rank 0) how far the samples got and that the same command makes the rest: finished
    batches are kept, a half-written one is discarded when it resumes."""
    try:
        yield
    except KeyboardInterrupt:
        if is_main:
            done = sum(part_path(out, j).is_file() for j in range(n_batches))
            print(f"selfflow: {done} of {n_batches} batches of samples are written in {out}; run the same command "
                  "again to make the rest", file=sys.stderr)
        raise


def assemble(out: Path, num: int, n_batches: int, npz: bool = True) -> Path | None:
    """Concatenate the part files into ``samples_<num>.npz`` (``arr_0``; ``arr_1`` labels, ``prompts``),
    atomically, and write ``prompts.jsonl`` when the samples have prompts. Returns the ``.npz`` path."""
    parts, files, labels, prompts = [], [], [], []
    for j in range(n_batches):
        p = part_path(out, j)
        if not p.is_file():
            raise FileNotFoundError(f"{p} is missing: a rank did not finish (or {out} is not shared by all "
                                    "ranks); run the same command again to complete it")
        parts.append(np.load(p))
        meta = json.loads(meta_path(out, j).read_text())
        files += meta["files"]
        labels += meta["labels"] or []
        prompts += meta["prompts"] or []
    prompts = prompts[:num]
    if prompts:
        write_prompt_records(out, files[:num], prompts)
    if not (npz and parts and parts[0].size):
        return None
    arrays = {"arr_0": np.concatenate(parts)[:num]}
    if len(arrays["arr_0"]) != num:
        raise RuntimeError(f"expected {num} samples in the parts, found {len(arrays['arr_0'])}")
    if len(labels) >= num:
        arrays["arr_1"] = np.asarray(labels[:num], dtype=np.int64)
    if prompts:
        arrays["prompts"] = np.asarray(prompts, dtype=str)
    path = out / f"samples_{num}.npz"
    tmp = out / f"samples_{num}.tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return path
