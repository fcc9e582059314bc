"""Oobleck audio VAEs through diffusers ``AutoencoderOobleck``, with per-channel latent normalisation.

- SongBloom's VAE (the paper's): 48 kHz stereo, 1920× downsampling (25 latent frames/s), 64 channels;
  published in stable-audio-tools format — convert it once with :mod:`selfflow.audio.songbloom`.
- Stable Audio Open 1.0's VAE (the alternative): 44.1 kHz stereo, 2048×, 64 channels, diffusers format.

Neither VAE ships latent statistics, so the normalisation ``(z − mean) / std`` uses per-channel statistics
of the prepared dataset (:func:`selfflow.core.data.stats.latent_stats`), or none (0 / 1) until they are set.
The encoder takes the posterior mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from selfflow.core.codec import CodecShape, NormalizedVAE, diffusers_from_pretrained

WEIGHTS = {
    "songbloom": "CypressYang/SongBloom (stable_audio_1920_vae.json + autoencoder_music_dsp1920.ckpt; "
                 "convert with `python -m selfflow.audio.songbloom CONFIG CKPT OUT_DIR`)",
    "stable_audio": "stabilityai/stable-audio-open-1.0 (subfolder vae/, gated: accept the licence first)",
}


def clip_samples(seconds: float, sample_rate: int, hop: int) -> int:
    """Waveform samples of a ``seconds`` clip, rounded down to a whole number of latent frames."""
    return round(seconds * sample_rate) // hop * hop


@dataclass(frozen=True)
class OobleckShape(CodecShape):
    """A published Oobleck VAE's shape (``downsample`` = the hop), standing in for it under ``shapes_only()``."""

    sample_rate: int = 48000

    @property
    def hop(self) -> int:
        return self.downsample


PUBLISHED_SHAPES = {
    "songbloom": OobleckShape("SongBloom VAE (CypressYang/SongBloom)", 64, 1920, 48000),
    "stable_audio": OobleckShape("Stable Audio Open 1.0 VAE", 64, 2048, 44100),
}


class OobleckCodec(NormalizedVAE):
    """``(B, 2, N)`` waveform in [-1, 1] ↔ normalised latents ``(B, C, N / hop)``."""

    def __init__(self, vae: nn.Module, mean: list[float] | None = None, std: list[float] | None = None):
        cfg = vae.config
        c = cfg.decoder_input_channels
        super().__init__(vae, torch.zeros(1, c, 1), torch.ones(1, c, 1))
        self.latent_channels = c
        self.hop = math.prod(cfg.downsampling_ratios)
        self.sample_rate = int(cfg.sampling_rate)
        self.audio_channels = int(cfg.audio_channels)
        if mean is not None and std is not None:
            self.set_stats(mean, std)

    def set_stats(self, mean: list[float], std: list[float]) -> None:
        if len(mean) != self.latent_channels or len(std) != self.latent_channels:
            raise ValueError(f"latent statistics have {len(mean)}/{len(std)} channels, the VAE {self.latent_channels}")
        self.mean.copy_(torch.tensor(mean).view(1, -1, 1))
        self.std.copy_(torch.tensor(std).view(1, -1, 1))

    @classmethod
    def from_pretrained(cls, path: str | Path, kind: str = "songbloom", dtype: torch.dtype = torch.float32
                        ) -> OobleckCodec:
        """Load a diffusers-format ``AutoencoderOobleck`` directory — never downloads."""
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"audio VAE directory {path} not found (no config.json). The {kind} VAE is published as "
                f"{WEIGHTS.get(kind, WEIGHTS['songbloom'])}; point data.options.vae_dir (training) or --vae-dir (prepare) at the diffusers folder.")
        return cls(diffusers_from_pretrained("AutoencoderOobleck", path, torch_dtype=dtype))

    def latent_length(self, num_samples: int) -> int:
        if num_samples % self.hop:
            raise ValueError(f"audio length {num_samples} is not a multiple of the VAE hop {self.hop}")
        return num_samples // self.hop

    @torch.no_grad()
    def encode_raw(self, wave: torch.Tensor) -> torch.Tensor:
        """Posterior mean ``(B, C, N / hop)``, unnormalised (what shards store)."""
        self.latent_length(wave.shape[-1])
        return super().encode_raw(wave)

    def describe(self) -> dict[str, Any]:
        return {"codec": f"oobleck-z{self.latent_channels}-hop{self.hop}", "sample_rate": self.sample_rate}
