"""``selfflow sample --num N``: many samples for evaluation, sharded over ``torchrun`` ranks, resumable.

The index space ``0 … N−1`` is cut into fixed batches ``j = [j·B, (j+1)·B)``; the unfinished ones are dealt
round-robin to the ranks. A sample's label, initial noise and (SDE) Brownian increments come from its own generator,
seeded by ``(seed, index)``, and a batch always holds the same indices — so the samples are bit-identical
on any number of ranks and across restarts. Each finished batch leaves its per-sample files (PNG …, written
atomically) and then a part file ``parts/batch_XXXXXX.npy`` with its evaluation array; a batch with a part
file is done and skipped on restart. Rank 0 finally concatenates the parts into ``samples_N.npz``
(``arr_0``, the ADM evaluator's format; the output directory must be shared by the ranks).

``official_repro`` swaps this layout for the official ``sample.py``'s (:mod:`.official_repro`): batches seeded
per (rank, batch) of an official run on ``official_world_size`` GPUs, the global generator, bf16 autocast and
truncation to uint8 — still resumable, and still the same on any number of our ranks.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from tqdm import tqdm

from .distributed import DistInfo, barrier
from .modality import Modality
from .official_repro import SeededBatch, official_batches, official_generate_batch
from .sampler import SamplerConfig, autocast, sample
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


def sample_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator of sample ``index`` (independent streams per (seed, index))."""
    state = np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def part_path(out_dir: Path, batch: int) -> Path:
    return out_dir / "parts" / f"batch_{batch:06d}.npy"


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
                   label_mode: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Decoded media and labels for ``indices``; every random number comes from the samples' generators."""
    gens = [sample_generator(seed, i) for i in indices]
    n = len(indices)
    labels = None
    if modality.num_classes:
        k = modality.num_classes
        labels = torch.tensor([i % k if label_mode == "balanced" else int(torch.randint(k, (1,), generator=g))
                               for i, g in zip(indices, gens)], device=device)
        cond = Conditioning(labels=labels)
        null = Conditioning(labels=torch.full_like(labels, k))
    else:
        cond, null, _ = modality.sample_conditions(n, device)
    ids = modality.sample_ids(n, device)
    noise = torch.cat([torch.randn((1, ids.shape[1], modality.token_channels), generator=g) for g in gens])
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
                        opts: SampleManyConfig, device: torch.device, out: Path) -> np.ndarray | None:
    """Our default batch: per-index seeds, the modality's files and evaluation array."""
    media, labels = generate_batch(model, modality, sampler, indices, opts.seed, opts.labels, device)
    if opts.png:
        with tempfile.TemporaryDirectory(dir=out) as tmp:
            for k, i in enumerate(indices):
                label = None if labels is None else int(labels[k])
                written = modality.write_sample(media[k], label, Path(tmp) / f"{i:06d}")
                os.replace(written, out / written.name)
    return modality.evaluation_array(media)


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
    out = Path(opts.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    batches = plan_batches(opts, dist.world_size)
    n_batches = len(batches)
    remaining = [j for j in range(n_batches) if not part_path(out, j).is_file()]
    barrier()  # every rank lists the finished batches before any rank adds one
    mine = remaining[dist.rank::dist.world_size]
    model.eval()
    bar = tqdm(total=opts.num, initial=max(0, opts.num - len(remaining) * opts.batch_size), unit="sample",
               disable=not (progress and dist.is_main), desc=f"sample on {dist.world_size} rank(s)",
               dynamic_ncols=True)
    for j in mine:
        indices = batches[j].indices
        if opts.official_repro:
            array, _ = official_generate_batch(model, modality, sampler, batches[j], dist.device)
            if opts.png:  # positions past num (the official last rank's overshoot) are generated, not kept
                _write_images(array, [i for i in indices if i < opts.num], out)
        else:
            array = _generate_and_write(model, modality, sampler, indices, opts, dist.device, out)
        _atomic_save_npy(part_path(out, j), np.zeros(0, np.uint8) if array is None else array)
        if delay := os.environ.get("SELFFLOW_FAULT_SAMPLE_DELAY"):  # kill/restart tests: slow each batch
            time.sleep(float(delay))
        bar.update(min(len(indices) * dist.world_size, bar.total - bar.n))
    bar.close()
    barrier()
    if not (dist.is_main and opts.npz):
        return None
    return assemble_npz(out, opts.num, n_batches)


def assemble_npz(out: Path, num: int, n_batches: int) -> Path | None:
    """Concatenate the part files into ``samples_<num>.npz`` (``arr_0``), atomically."""
    parts = []
    for j in range(n_batches):
        p = part_path(out, j)
        if not p.is_file():
            raise FileNotFoundError(f"{p} is missing: a rank did not finish (or {out} is not shared by all "
                                    "ranks); run the same command again to complete it")
        parts.append(np.load(p))
    if not parts or parts[0].size == 0:
        return None
    arr = np.concatenate(parts)[:num]
    if len(arr) != num:
        raise RuntimeError(f"expected {num} samples in the parts, found {len(arr)}")
    path = out / f"samples_{num}.npz"
    tmp = out / f"samples_{num}.tmp.npz"
    np.savez(tmp, arr_0=arr)
    os.replace(tmp, path)
    return path
