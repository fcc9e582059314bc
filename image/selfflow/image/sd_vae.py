"""SD-VAE (diffusers ``AutoencoderKL``, sd-vae-ft-ema / ft-mse) from a local directory, ×0.18215.

Images are RGB in [-1, 1], ``(B, 3, H, W)``; latents are ``(B, 4, H/8, W/8)`` *scaled* by the scaling factor
(``z·0.18215``), the space the DiT is trained in. ``moments`` returns the unscaled posterior mean and std
that ``selfflow prepare imagenet`` stores (REPA's practice), from which training draws
``z = (mean + std·ε)·0.18215``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from selfflow.core.codec import NormalizedVAE, diffusers_from_pretrained
from selfflow.core.tokens import Tokens, patchify, unpatchify

SD_VAE_SCALE = 0.18215


def load_autoencoder_kl(path: str | Path, device: torch.device | str = "cpu"):
    """``AutoencoderKL.from_pretrained(path)`` offline; a missing directory is an error saying where to get it."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no AutoencoderKL at {path} (config.json missing): download the diffusers folder of "
            "stabilityai/sd-vae-ft-ema (or sd-vae-ft-mse), e.g. `hf download "
            f"stabilityai/sd-vae-ft-ema --local-dir {path}`, on a machine with network access")
    return diffusers_from_pretrained("AutoencoderKL", path).to(device).eval().requires_grad_(False)


class SDVAE(NormalizedVAE):
    """Encode/decode with a frozen ``AutoencoderKL`` in the scaled latent space: the normalisation is the
    product ``z·scale`` (not ``z / (1/scale)``), bitwise the reference code's."""

    def __init__(self, vae, scaling_factor: float = SD_VAE_SCALE):
        super().__init__(vae)
        self.scale = scaling_factor

    @classmethod
    def from_pretrained(cls, path: str | Path, device: torch.device | str = "cpu",
                        scaling_factor: float = SD_VAE_SCALE) -> SDVAE:
        return cls(load_autoencoder_kl(path, device), scaling_factor)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.scale

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.scale

    @torch.no_grad()
    def moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unscaled posterior ``mean, std`` ``(B, 4, h, w)`` (fp32)."""
        dist = self.vae.encode(images.to(self.device, self.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()


class LatentCodec:
    """Images ↔ tokens through the SD-VAE: ``(B, 3, H, W)`` → ``(B, (H/8p)², 4·p²)``, the official layout."""

    def __init__(self, vae: SDVAE, image_size: int, patch_size: int):
        lat = image_size // vae.downsample
        if image_size % vae.downsample or lat % patch_size:
            raise ValueError(f"image_size {image_size} does not give a latent divisible by patch {patch_size}")
        self.vae, self.image_size, self.patch_size, self.latent_size = vae, image_size, patch_size, lat

    @property
    def grid(self) -> tuple[int, int, int]:
        g = self.latent_size // self.patch_size
        return (1, g, g)

    @property
    def token_channels(self) -> int:
        return self.vae.latent_channels * self.patch_size**2

    def latents_to_tokens(self, latents: torch.Tensor) -> Tokens:
        return patchify(latents.unsqueeze(2), (1, self.patch_size, self.patch_size))

    def to_tokens(self, images: torch.Tensor) -> Tokens:
        return self.latents_to_tokens(self.vae.encode(images))

    def from_tokens(self, x: torch.Tensor) -> torch.Tensor:
        latents = unpatchify(x, self.grid, (1, self.patch_size, self.patch_size)).squeeze(2)
        return self.vae.decode(latents)
