"""The public Python API: load a trained model and sample from it.

    from selfflow.core import load

    model = load("runs/tiny-mixed", modality="image")           # run dir, pretrained dir or ema.safetensors
    images = model.sample(prompts=["a red circle", "a blue square"], steps=20, cfg_scale=3.0, seed=0)
    model.save(images, "out/grid")                               # the modality's writer (PNG grid …)
    model.save_pretrained("out/model")                           # config.json + model.safetensors
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError
from .generate import conditions_for, generate, sampler_config
from .pretrained import LoadedModel, load_model, save_pretrained
from .prompts import write_grid_prompts


class Sampler:
    """A loaded model and the modality it samples; :meth:`sample` returns decoded media (images ``(B, 3, H, W)``
    in [-1, 1], videos, waveforms … as the modality decodes them)."""

    def __init__(self, loaded: LoadedModel):
        self.model, self.modality, self.config = loaded.model, loaded.modality, loaded.config
        self.model_config, self.data_facts = loaded.model_config, loaded.data_facts

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()  # not inference_mode: the caller may edit the samples in place or feed them to autograd
    def sample(self, n: int | None = None, *, prompts: Sequence[str] | str | None = None,
               labels: Sequence[int] | torch.Tensor | int | None = None, steps: int | None = None,
               cfg_scale: float | None = None, seed: int = 0, solver: str | None = None) -> torch.Tensor:
        """``n`` samples (default: one per prompt or label, else the run's ``sample.num_samples``); sample ``i``
        gets ``prompts[i mod P]`` (text-conditioned models) or ``labels[i mod K]`` (class-conditional ones).
        ``steps`` / ``cfg_scale`` / ``solver`` default to the run's ``sample`` settings. Same seed → same
        samples: one noise draw for the whole batch, as ``selfflow sample``'s grid draws it (its ``--out-dir``
        draws each sample from ``(seed, index)`` instead, so that any split over ranks gives the same files)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if isinstance(labels, int):
            labels = [labels]
        for name, value, low in (("n", n, 1), ("seed", seed, 0)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise ConfigError(f"{name} must be an integer ≥ {low}, got {value!r}")
        given = prompts if prompts is not None else labels
        if n is None:
            n = len(given) if given is not None else self.config.sample.num_samples
        sampler = sampler_config(self.config.sampler(self.modality), steps=steps, cfg_scale=cfg_scale,
                                 solver=solver)
        media, _ = generate(self.model, self.modality, n, sampler, seed, self.device, prompts=prompts,
                            labels=labels)
        return media

    def save(self, media: torch.Tensor, path: str | Path, *, labels: Sequence[int] | torch.Tensor | None = None,
             prompts: Sequence[str] | str | None = None) -> Path:
        """Write samples with the modality's writer (PNG grid, MP4s, WAVs …); returns the file written. Pass the
        ``labels`` or ``prompts`` they were sampled with to caption them as ``selfflow sample`` does (class names
        under a class-conditional grid; ``<path>.prompts.txt``, sample i's prompt on line i)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        shown = None
        if labels is not None:  # display labels, cycled over the samples as sample() cycles them
            _, _, shown = conditions_for(self.modality, len(media), "cpu", labels=labels)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        written = self.modality.save_samples(media, shown, Path(path))
        if prompts is not None:
            if not prompts:
                raise ConfigError("the prompt list is empty")
            write_grid_prompts(written, prompts, len(media))
        return written

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """This model as a pretrained directory (``config.json`` + ``model.safetensors``)."""
        return save_pretrained(out_dir, self.model.state_dict(), self.config, self.model_config, self.data_facts)


def load(path: str | Path, *, modality: str | None = None, device: str | torch.device = "auto",
         weights: str = "ema", locations: Mapping[str, Any] | None = None) -> Sampler:
    """A :class:`Sampler` from a run directory, a pretrained directory or a weights file in one;
    ``modality`` picks the modality of a mixed model (default: the first); ``device``: ``auto`` (CUDA when
    available), ``cpu``, ``cuda``, ``cuda:N`` or a ``torch.device``; ``weights``: ``ema`` (the EMA weights, what
    the paper samples) or ``model`` (a run's newest checkpoint's raw weights; a pretrained directory holds one
    set only); ``locations``: where folders the model reads lie on this machine, when they moved since it was
    trained (``{"data.options.vae_path": "/models/sd-vae"}``; only such keys)."""
    sets = [f"{key}={json.dumps(os.fspath(v) if isinstance(v, os.PathLike) else v)}" for key, v in
            (locations or {}).items()]
    return Sampler(load_model(path, device, modality, weights, sets))
