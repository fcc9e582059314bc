"""``selfflow sample --official-repro``: the random draws, precision and quantisation of the official ImageNet
``sample.py`` (black-forest-labs/Self-Flow), so that its ``samples_N.npz`` can be reproduced from the released
checkpoint on the same kind of GPU.

What the official script does differently from our default (training-anchors §1.5):

- **Seeds per batch, not per sample.** Rank ``r`` of ``W`` makes ``ceil(N / W)`` samples in batches of ``B``;
  batch ``j`` starts with ``torch.manual_seed(seed + r·100000 + j)`` (seed 31) and draws its labels
  (``randint(0, 1000)``), its initial noise (``(B, 4, 32, 32)`` in bf16, on the device) and, through the
  SiT integrator's ``torch.randn(x.size())``, every Brownian increment from the *global* CPU generator. Rank
  0 concatenates the ranks' samples in rank order and keeps the first N. Here the same (indices, seed)
  batches are computed for the official ``W`` and dealt to however many ranks run.
- **bf16 autocast** around sampling and decoding.
- **Truncation to uint8**: ``((x + 1) / 2).clamp(0, 1) · 255`` cast to uint8, where our default rounds.

Not in the reference notes, so assumed here and worth checking against the official script on a GPU: the
labels are drawn before the noise, the bf16 noise is promoted to fp32 for the SDE state, and the last batch
of a rank holds only the remaining ``ceil(N / W) − j·B`` samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .config import ConfigError
from .modality import Modality
from .sampler import SamplerConfig, autocast, sample
from .tokens import Conditioning

OFFICIAL_SEED = 31  # the official sample.py's --seed default
RANK_SEED_STRIDE = 100_000


@dataclass(frozen=True)
class SeededBatch:
    """A batch's positions in ``samples_N.npz`` and its seed: in the official layout the batch's
    ``torch.manual_seed`` (the last rank's positions may run past N; they are cut when the parts are joined),
    in ours the run seed from which each index derives its own generator."""

    indices: list[int]
    seed: int


def official_batches(num: int, batch_size: int, world_size: int, seed: int = OFFICIAL_SEED) -> list[SeededBatch]:
    """The batches of an official run on ``world_size`` GPUs, rank by rank, in ``samples_N.npz`` order."""
    per_rank = -(-num // world_size)
    per_rank_batches = -(-per_rank // batch_size)
    out = []
    for rank in range(world_size):
        first = rank * per_rank
        for j in range(per_rank_batches):
            lo, hi = first + j * batch_size, first + min((j + 1) * batch_size, per_rank)
            out.append(SeededBatch(list(range(lo, hi)), seed + rank * RANK_SEED_STRIDE + j))
    return out


def official_noise(modality: Modality, n: int, device: torch.device | str) -> torch.Tensor:
    """Initial noise ``(n, L, C)``: a bf16 latent ``(n, c, h, w)`` from the global generator, patchified."""
    codec = getattr(modality, "codec", None)
    if codec is None or not hasattr(codec, "latents_to_tokens"):
        raise ConfigError(f"--official-repro follows the official ImageNet sample.py: it needs a latent image "
                          f"modality (e.g. --official-ckpt with --vae), not {modality.name!r}")
    size = codec.latent_size
    latents = torch.randn(n, codec.vae.latent_channels, size, size, device=device, dtype=torch.bfloat16)
    return codec.latents_to_tokens(latents.float()).x


def truncate_uint8(images: torch.Tensor) -> np.ndarray:
    """``(B, 3, H, W)`` in [-1, 1] → ``(B, H, W, 3)`` uint8 by truncation, as the official ``astype(uint8)``."""
    x = ((images.detach().float() + 1) / 2).clamp(0, 1)
    return (x * 255).permute(0, 2, 3, 1).to(torch.uint8).cpu().numpy()


@torch.no_grad()
def official_generate_batch(model: nn.Module, modality: Modality, sampler: SamplerConfig, batch: SeededBatch,
                            device: torch.device) -> tuple[np.ndarray, torch.Tensor]:
    """The uint8 images ``(B, H, W, 3)`` and labels of one official batch."""
    if not modality.num_classes:
        raise ConfigError(f"--official-repro needs a class-conditional modality; {modality.name!r} has no classes")
    n = len(batch.indices)
    torch.manual_seed(batch.seed)
    labels = torch.randint(0, modality.num_classes, (n,), device=device)
    noise = official_noise(modality, n, device)
    cond = Conditioning(labels=labels)
    null = Conditioning(labels=torch.full_like(labels, modality.num_classes))
    ids = modality.sample_ids(n, device)
    cfg = sampler.model_copy(update={"precision": "bf16"})
    with autocast("bf16", device):
        x = sample(model, noise, ids, cond, cfg, null, modality.name, generator=torch.default_generator)
        media = modality.decode(x.float())
    return truncate_uint8(media), labels
