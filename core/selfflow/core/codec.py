"""The codec interface (media ↔ model-space latents) and the normalised-VAE base every autoencoder uses.

A :class:`Codec` maps media (images ``(B, 3, H, W)``, video ``(B, 3, F, H, W)``, waveforms ``(B, A, N)``, all
in [-1, 1]) to the latents the backbone is trained on and back. :class:`NormalizedVAE` is the shared
implementation for frozen diffusers autoencoders: ``encode = normalize(encode_raw(media))`` where
``encode_raw`` is the posterior mean and ``normalize`` is ``(z − mean) / std`` with per-channel
statistics; ``decode`` inverts both and clamps to [-1, 1]. Subclasses change only what differs: the
statistics (Wan's config, the dataset's for Oobleck, FLUX.2's BatchNorm after a 2×2 patchify), a scale
(SD-VAE's ``z·0.18215``, kept as a product so the numbers stay those of the reference code) or none at all
(RAE, which diffusers normalises inside), and the input/output range of the autoencoder.

:func:`shapes_only` builds runs from their configs alone (``selfflow plan``, before anything is downloaded):
inside it, a codec whose local folder is absent stands in as its published shape (:class:`CodecShape`), and
latent shards without ``codec.json`` take the shape ``selfflow prepare`` writes with its default options.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

_SHAPES_ONLY: ContextVar[bool] = ContextVar("selfflow_shapes_only", default=False)


class Codec(ABC):
    """Media ↔ latents. ``latent_channels`` is the channel count of the model-space latent."""

    latent_channels: int

    @abstractmethod
    def encode(self, media: torch.Tensor) -> torch.Tensor:
        """Media in [-1, 1] → model-space latents (float32)."""

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Model-space latents → media in [-1, 1] (float32)."""


@contextmanager
def shapes_only() -> Iterator[None]:
    """Within this block, modalities need no autoencoder weights, text-encoder weights or prepared shards to be
    built: what is absent is replaced by its published shape. Nothing built inside can encode or decode."""
    token = _SHAPES_ONLY.set(True)
    try:
        yield
    finally:
        _SHAPES_ONLY.reset(token)


def shapes_only_active() -> bool:
    """Whether runs are being built under :func:`shapes_only`."""
    return _SHAPES_ONLY.get()


def stands_in(folder: str | Path | None, marker: str = "config.json") -> bool:
    """Whether a loader should return a published shape instead of reading ``folder``: only under
    :func:`shapes_only`, and only when ``folder/marker`` is absent (a present folder is read as always)."""
    return shapes_only_active() and not (folder and (Path(folder) / marker).is_file())


def check_diffusers_class(path: str | Path, class_name: str) -> None:
    """Refuse a diffusers folder whose ``config.json`` names another model class: diffusers loads what weights fit
    into the class asked for and initialises the rest at random, so a Wan VAE given as an Oobleck one prepared
    noise with a warning buried in the log (no ``_class_name``, or an unreadable file: diffusers' own checks)."""
    try:
        found = json.loads((Path(path) / "config.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return
    if found and found != class_name:
        raise ValueError(f"{path} holds a {found} (its config.json's _class_name), not the {class_name} this codec "
                         f"loads: point at a {class_name} folder")


def diffusers_from_pretrained(class_name: str, path: str | Path, **kwargs: Any) -> Any:
    """``diffusers.<class_name>.from_pretrained(path)`` from local files only, after :func:`check_diffusers_class`.
    Without ``accelerate`` it loads the plain way (``low_cpu_mem_usage=False``): diffusers' default printed a
    notice to install it at every load, in every run's output."""
    import diffusers
    from diffusers.utils import is_accelerate_available

    check_diffusers_class(path, class_name)
    return getattr(diffusers, class_name).from_pretrained(
        str(path), local_files_only=True, low_cpu_mem_usage=is_accelerate_available(), **kwargs)


@dataclass(frozen=True)
class CodecShape(Codec):
    """A published autoencoder's shape (the figures of its ``config.json``, in model space), standing in for it
    under :func:`shapes_only`: enough to size the backbone and its tokens, never to encode or decode."""

    name: str
    latent_channels: int
    downsample: int = 1  # pixels (or samples) per latent cell along each compressed axis

    def encode(self, media: torch.Tensor) -> torch.Tensor:
        raise self._shape_only("encode")

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise self._shape_only("decode")

    def _shape_only(self, what: str) -> RuntimeError:
        return RuntimeError(f"{self.name}: only its shape is known (built under shapes_only(), as `selfflow plan` "
                            f"does); load the autoencoder from its folder to {what}")


class NormalizedVAE(nn.Module, Codec):
    """A frozen diffusers autoencoder with per-channel latent normalisation (see the module doc).

    ``mean`` / ``std`` (shaped to broadcast against a raw latent, e.g. ``(1, C, 1, 1, 1)`` for video) become
    buffers, so ``.to(device)`` moves them with the autoencoder; a subclass without them overrides
    :meth:`latent_stats` or :meth:`normalize` / :meth:`denormalize`.
    """

    def __init__(self, vae: nn.Module, mean: torch.Tensor | None = None, std: torch.Tensor | None = None):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        if mean is not None and std is not None:
            self.register_buffer("mean", mean.float())
            self.register_buffer("std", std.float())

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def latent_stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, std)`` on ``z``'s device and dtype."""
        return self.mean.to(z), self.std.to(z)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw posterior latent → model space."""
        mean, std = self.latent_stats(z)
        return (z - mean) / std

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Model space → raw latent."""
        mean, std = self.latent_stats(z)
        return z * std + mean

    def vae_input(self, media: torch.Tensor) -> torch.Tensor:
        """Media in [-1, 1] → what the autoencoder takes (the identity; RAE wants [0, 1])."""
        return media

    def vae_output(self, out: torch.Tensor) -> torch.Tensor:
        """What the autoencoder emits → media in [-1, 1] before clamping (the identity)."""
        return out

    @torch.no_grad()
    def encode_raw(self, media: torch.Tensor) -> torch.Tensor:
        """Posterior mean, unnormalised (fp32): what latent shards store where the normalisation may change."""
        return self.vae.encode(self.vae_input(media).to(self.device, self.dtype)).latent_dist.mean.float()

    @torch.no_grad()
    def encode(self, media: torch.Tensor) -> torch.Tensor:
        return self.normalize(self.encode_raw(media))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raw = self.denormalize(latents.to(self.device))
        return self.vae_output(self.vae.decode(raw.to(self.dtype)).sample.float()).clamp(-1, 1)
