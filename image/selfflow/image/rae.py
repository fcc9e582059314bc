"""RAE (representation autoencoder; diffusers ``AutoencoderRAE``) from a local directory.

The encoder is a frozen DINOv2-B with registers: RGB in [0, 1] is bicubic-resized to ``encoder_input_size``
(224) and ImageNet-normalised *inside* diffusers, giving ``(B, 768, 16, 16)``; the ViT decoder emits
``patch_size·16`` = 256 px in [0, 1]. The framework's images are in [-1, 1], so this wrapper maps
``x → (x + 1)/2`` on the way in and ``y → 2y − 1`` on the way out.

Latent normalisation: RAE (``bytetriper/RAE``) uses per-element ``stat.pt`` statistics,
``(z − mean)/sqrt(var + 1e-5)``. ``AutoencoderRAE`` already normalises inside ``encode()``/``decode()`` with
its ``latents_mean``/``latents_std`` buffers as ``(z − mean)/(std + 1e-5)``, so this wrapper does **not**
normalise again; :func:`rae_latent_stats` turns ``stat.pt``'s ``(mean, var)`` into the buffers that make
diffusers' formula equal RAE's exactly (``std = sqrt(var + 1e-5) − 1e-5``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from selfflow.core.codec import NormalizedVAE

from .flux2_ae import load_local_diffusers

RAE_EPS = 1e-5  # both RAE's sqrt(var + eps) and diffusers' (std + eps)
RAE_HINT = ("nyu-visionx/RAE-dinov2-wReg-base-ViTXL-n08 (diffusers AutoencoderRAE format), e.g. "
            "`hf download nyu-visionx/RAE-dinov2-wReg-base-ViTXL-n08 --local-dir DIR`")


def rae_latent_stats(mean: torch.Tensor, var: torch.Tensor, eps: float = RAE_EPS) -> tuple[list, list]:
    """RAE's ``stat.pt`` ``mean``/``var`` ``(C, h, w)`` → ``AutoencoderRAE(latents_mean=…, latents_std=…)``
    such that diffusers' ``(z − mean)/(std + 1e-5)`` is RAE's ``(z − mean)/sqrt(var + eps)``."""
    std = torch.sqrt(var.double() + eps) - RAE_EPS
    return mean.double().tolist(), std.tolist()


class RAE(NormalizedVAE):
    """Encode/decode with a frozen ``AutoencoderRAE`` (normalised latent space); plugs into
    ``sd_vae.LatentCodec`` with patch 1. diffusers normalises inside, so :meth:`normalize` is the identity."""

    @classmethod
    def from_pretrained(cls, path: str | Path, device: torch.device | str = "cpu") -> RAE:
        return cls(load_local_diffusers("AutoencoderRAE", path, RAE_HINT, device))

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.encoder_hidden_size)

    @property
    def downsample(self) -> int:
        """Output pixels per latent cell: the decoder's patch (16 → 256 px from 16×16 tokens)."""
        return int(self.vae.config.patch_size)

    @property
    def image_size(self) -> int:
        """The decoder's output size: the only size whose latent grid ``LatentCodec`` computes correctly, since
        the encoder resizes any input to ``encoder_input_size`` (``16 · (224 / 14)`` = 256 px for DINOv2-B)."""
        c = self.vae.config
        return c.patch_size * (c.encoder_input_size // c.encoder_patch_size)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def vae_input(self, media: torch.Tensor) -> torch.Tensor:
        return (media.float() + 1) / 2

    def vae_output(self, out: torch.Tensor) -> torch.Tensor:
        return 2 * out - 1

    @torch.no_grad()
    def encode_raw(self, media: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] ``(B, 3, H, W)`` → normalised latents ``(B, C, h, w)`` (fp32)."""
        return self.vae.encode(self.vae_input(media).to(self.device, self.dtype)).latent.float()
