"""The Wan video VAEs through diffusers ``AutoencoderKLWan``, with per-channel latent normalisation.

- Wan2.2 (TI2V-5B VAE): 48 channels, compression (4, 16, 16) — the paper's video autoencoder;
- Wan2.1 (also used by the Wan2.2 A14B models): 16 channels, compression (4, 8, 8).

Both are one class with two configs. diffusers' ``encode`` returns the *raw* posterior; Wan pipelines
normalise with the per-channel ``latents_mean`` / ``latents_std`` of the config, ``(z − mean) / std``,
and so do we (explicitly, here). The encoder takes the posterior mean; decoding clamps to [-1, 1].
Shards store the raw mean, so the normalisation can change without re-encoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from selfflow.core.codec import CodecShape, NormalizedVAE, diffusers_from_pretrained

# Where the diffusers-format weights are published (the `vae/` folder of these repos).
WEIGHTS = {
    "wan2.2": "Wan-AI/Wan2.2-TI2V-5B-Diffusers (subfolder vae/)",
    "wan2.1": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers (subfolder vae/)",
}


class WanGeometry:
    """The latent grid of a Wan VAE: ``latent_channels`` and ``compression`` = (time, height, width)."""

    latent_channels: int
    compression: tuple[int, int, int]

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        ct, ch, cw = self.compression
        self.check_input(frames, height, width)
        return (self.latent_channels, (frames - 1) // ct + 1, height // ch, width // cw)

    def check_input(self, frames: int, height: int, width: int) -> None:
        ct, ch, cw = self.compression
        if (frames - 1) % ct or height % ch or width % cw:
            raise ValueError(f"Wan VAE input needs {ct}k+1 frames and sizes divisible by {ch}; got "
                             f"{frames} frames of {height}×{width}")


@dataclass(frozen=True)
class WanShape(WanGeometry, CodecShape):
    """A published Wan VAE's shape, standing in for it under ``shapes_only()``."""

    compression: tuple[int, int, int] = (4, 16, 16)


PUBLISHED_SHAPES = {
    "wan2.2": WanShape("Wan2.2 VAE (Wan-AI/Wan2.2-TI2V-5B-Diffusers vae/)", 48, 16, (4, 16, 16)),
    "wan2.1": WanShape("Wan2.1 VAE (Wan-AI/Wan2.1-T2V-1.3B-Diffusers vae/)", 16, 8, (4, 8, 8)),
}


class WanCodec(WanGeometry, NormalizedVAE):
    """``(B, 3, F, H, W)`` video in [-1, 1] ↔ normalised latents ``(B, C, (F−1)/ct + 1, H/cs, W/cs)``."""

    def __init__(self, vae: nn.Module):
        cfg = vae.config
        c = cfg.z_dim
        super().__init__(vae, torch.tensor(cfg.latents_mean, dtype=torch.float32).view(1, c, 1, 1, 1),
                         torch.tensor(cfg.latents_std, dtype=torch.float32).view(1, c, 1, 1, 1))
        self.latent_channels = c
        self.compression = (int(cfg.scale_factor_temporal), int(cfg.scale_factor_spatial),
                            int(cfg.scale_factor_spatial))

    @classmethod
    def from_pretrained(cls, path: str | Path, version: str = "wan2.2", dtype: torch.dtype = torch.float32
                        ) -> WanCodec:
        """Load a diffusers-format VAE directory (``config.json`` + safetensors) — never downloads."""
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"Wan VAE directory {path} not found (no config.json). The {version} VAE in diffusers format "
                f"is published as {WEIGHTS.get(version, WEIGHTS['wan2.2'])}; download it on a machine with "
                "network and point data.options.vae_dir (training) or --vae-dir (prepare) at the vae/ folder "
                "(`selfflow plan` reads its config.json alone).")
        vae = diffusers_from_pretrained("AutoencoderKLWan", path, torch_dtype=dtype)
        codec = cls(vae)
        expected = PUBLISHED_SHAPES[version].compression if version in PUBLISHED_SHAPES else None
        if expected is not None and codec.compression != expected:
            raise ValueError(f"{path} holds a VAE with compression {codec.compression}, but codec {version!r} "
                             f"compresses {expected} (Wan2.2: 48 channels, 4×16×16; Wan2.1: 16, 4×8×8)")
        return codec

    @torch.no_grad()
    def encode_raw(self, video: torch.Tensor) -> torch.Tensor:
        """Posterior mean, unnormalised (what shards store)."""
        self.check_input(*video.shape[2:])
        return super().encode_raw(video)

    def describe(self) -> dict[str, Any]:
        """What shards record about the codec (``codec.json``)."""
        return {"codec": f"wan-z{self.latent_channels}", "compression": list(self.compression),
                "latent_mean": self.mean.flatten().tolist(), "latent_std": self.std.flatten().tolist()}
