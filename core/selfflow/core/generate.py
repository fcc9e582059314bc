"""Generate samples of a modality from a backbone: noise → ODE/SDE solve → decode."""

from __future__ import annotations

import torch
from torch import nn

from .modality import Modality
from .sampler import SamplerConfig, sample


@torch.no_grad()
def generate(model: nn.Module, modality: Modality, n: int, sampler: SamplerConfig, seed: int,
             device: torch.device | str, progress=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``n`` samples as decoded media and their display labels. Same seed → same samples."""
    cond, null_cond, labels = modality.sample_conditions(n, device)
    ids = modality.sample_ids(n, device)
    gen = torch.Generator(device=device).manual_seed(seed)
    noise = torch.randn((n, ids.shape[1], modality.token_channels), generator=gen, device=device)
    was_training = model.training
    model.eval()
    try:
        x = sample(model, noise, ids, cond, sampler, null_cond, modality.name, progress, gen)
    finally:
        model.train(was_training)
    return modality.decode(x.float()), labels
