"""Generate samples of a modality from a backbone: noise → ODE/SDE solve → decode."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ValidationError
from torch import nn

from .config import ConfigError
from .modality import Modality, preview_conditions
from .sampler import SamplerConfig, sample
from .tokens import Conditioning


def sampler_config(base: BaseModel, *, steps: int | None = None, solver: str | None = None,
                   cfg_scale: float | None = None, shift: float | None = None, precision: str | None = None,
                   guidance_low: float | None = None, guidance_high: float | None = None) -> SamplerConfig:
    """``base``'s sampler fields (a run's ``sample`` section or a :class:`SamplerConfig`) with the given
    overrides; ``None`` keeps the base value."""
    update: dict[str, Any] = {k: v for k, v in {"steps": steps, "solver": solver, "cfg_scale": cfg_scale,
                                                "shift": shift, "precision": precision}.items() if v is not None}
    if guidance_low is not None or guidance_high is not None:
        lo, hi = base.guidance_interval
        update["guidance_interval"] = (lo if guidance_low is None else guidance_low,
                                       hi if guidance_high is None else guidance_high)
    try:
        return SamplerConfig.model_validate({**base.model_dump(include=set(SamplerConfig.model_fields)), **update})
    except ValidationError as e:
        err = e.errors()[0]
        if not err["loc"]:  # a rule across fields (sde with steps: 1): the message names them
            raise ConfigError(f"sampler settings: {err['msg']}") from None
        raise ConfigError(f"sampler setting {'.'.join(map(str, err['loc']))}: {err['msg']} "
                          f"(got {err['input']!r})") from None


def require_prompts(modality: Modality) -> None:
    """A clear error unless ``modality`` is text-conditioned."""
    if not modality.context_dim:
        kind = f"class-conditional ({modality.num_classes} classes)" if modality.num_classes else "unconditional"
        raise ConfigError(f"prompts need a text-conditioned run, but its {modality.name!r} modality is {kind}"
                          + (": sample it by class (labels=… in Python; --labels random|balanced with --out-dir)"
                          if modality.num_classes else ""))


def conditions_for(modality: Modality, n: int, device: torch.device | str, *, prompts: Sequence[str] | None = None,
                   labels: Sequence[int] | torch.Tensor | int | None = None
                   ) -> tuple[Conditioning, Conditioning | None, torch.Tensor | None]:
    """Conditioning of ``n`` samples, its CFG null and display labels: sample ``i`` gets ``prompts[i mod P]``
    (text-conditioned runs) or ``labels[i mod K]`` (class-conditional runs); with neither, the modality's
    preview conditioning (classes or its sample captions in turn)."""
    if prompts is not None and labels is not None:
        raise ConfigError("give prompts or class labels, not both")
    if prompts is not None:
        require_prompts(modality)
        if not prompts:
            raise ConfigError("the prompt list is empty")
        cond, null = modality.prompt_conditions([prompts[i % len(prompts)] for i in range(n)], device)
        return cond, null, None
    if labels is not None:
        k = modality.num_classes
        if not k:
            raise ConfigError(f"class labels need a class-conditional run; its {modality.name!r} modality has no "
                              "classes" + (": give prompts instead" if modality.context_dim else ""))
        given = torch.as_tensor([labels] if isinstance(labels, int) else labels)
        if given.numel() == 0:
            raise ConfigError("the class label list is empty")
        if given.is_floating_point() or given.is_complex() or given.dtype == torch.bool:
            raise ConfigError(f"class labels must be integers, got {given.dtype} values {given.flatten()[:8].tolist()}")
        given = given.long().flatten()
        if bool(((given < 0) | (given >= k)).any()):
            raise ConfigError(f"class labels must lie in 0…{k - 1}, got {given.tolist()}")
        chosen = given[torch.arange(n) % given.numel()].to(device)
        return Conditioning(labels=chosen), Conditioning(labels=torch.full_like(chosen, k)), chosen
    return preview_conditions(modality, n, device)


@torch.no_grad()
def generate(model: nn.Module, modality: Modality, n: int, sampler: SamplerConfig, seed: int,
             device: torch.device | str, progress=None, *, prompts: Sequence[str] | None = None,
             labels: Sequence[int] | torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``n`` samples as decoded media and their display labels (``None`` with prompts). Same seed → same
    samples. ``prompts`` / ``labels``: see :func:`conditions_for`."""
    cond, null_cond, shown = conditions_for(modality, n, device, prompts=prompts, labels=labels)
    ids = modality.sample_ids(n, device)
    gen = torch.Generator(device=device).manual_seed(seed)
    noise = torch.randn((n, ids.shape[1], modality.token_channels), generator=gen, device=device)
    was_training = model.training
    model.eval()
    try:
        x = sample(model, noise, ids, cond, sampler, null_cond, modality.name, progress, gen)
    finally:
        model.train(was_training)
    return modality.decode(x.float()), shown


def sample_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator of sample ``index`` (independent streams per (seed, index))."""
    state = np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def seeded_noise(generators: Sequence[torch.Generator], length: int, channels: int) -> torch.Tensor:
    """Initial noise ``(B, L, C)`` on the CPU, row ``b`` drawn from ``generators[b]`` (batch-independent)."""
    return torch.cat([torch.randn((1, length, channels), generator=g) for g in generators])


@torch.no_grad()
def generate_share_batches(model: nn.Module, modality: Modality, n: int, indices: Sequence[int],
                           sampler: SamplerConfig, seed: int, device: torch.device | str, progress=None, *,
                           batch_size: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Samples ``indices`` of a set of ``n``, one batch at a time: ``(media, labels)`` of ``indices[k·B : (k+1)·B]``
    (decoded media and display labels, as :func:`generate` returns) for each ``k`` in turn, so that a caller can
    move each batch off the device before the next is made (``batch_size`` ``None``: one batch). Sample ``i`` has
    the modality's preview conditioning of sample ``i`` (:meth:`~.modality.Modality.sample_conditions`: a batch
    encodes its own captions only) and draws its initial noise and SDE increments from :func:`sample_generator`
    ``(seed, i)``; so the set cut into shares on several ranks is the set one process makes (up to the
    floating-point effects of another batch size), and an index may repeat (a share padded to its peers' size).
    ``progress`` is called at every step of every batch."""
    indices = list(indices)
    if not indices or min(indices) < 0 or max(indices) >= n:
        raise ValueError(f"sample indices must be a non-empty list in 0…{n - 1}, got {indices[:8]}")
    step = batch_size or len(indices)
    was_training = model.training
    model.eval()
    try:
        for lo in range(0, len(indices), step):
            batch = indices[lo:lo + step]
            cond, null_cond, shown = preview_conditions(modality, torch.as_tensor(batch), device)
            generators = [sample_generator(seed, i) for i in batch]
            ids = modality.sample_ids(len(batch), device)
            noise = seeded_noise(generators, ids.shape[1], modality.token_channels).to(device)
            x = sample(model, noise, ids, cond, sampler, null_cond, modality.name, progress, generators)
            yield modality.decode(x.float()), shown
    finally:
        model.train(was_training)
