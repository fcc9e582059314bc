"""The FLUX.2 autoencoder (diffusers ``AutoencoderKLFlux2``) from a local directory, in FLUX.2's model space.

Images are RGB in [-1, 1], ``(B, 3, H, W)``. The VAE itself has 32 raw channels at ``H/8``; like BFL's
``AutoEncoder.encode`` (``black-forest-labs/flux2`` ``src/flux2/autoencoder.py``) we take the **posterior
mean**, patchify 2×2 (``c (i pi) (j pj) -> (c pi pj) i j``, diffusers' ``_patchify_latents`` order) to 128
channels at ``H/16`` and normalise with the checkpoint's BatchNorm running statistics
``(z − running_mean) / sqrt(running_var + batch_norm_eps)`` (eps 1e-4). diffusers' ``encode()`` does none of
this (its pipeline does), so it is done here; ``decode`` inverts it exactly.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from selfflow.core.codec import NormalizedVAE, diffusers_from_pretrained

FLUX2_HINT = ("black-forest-labs/FLUX.2-dev (subfolder vae/, or a FLUX.2 [klein] repo), e.g. `hf "
              "download black-forest-labs/FLUX.2-dev --include 'vae/*' --local-dir DIR` and point at DIR/vae")


def load_local_diffusers(class_name: str, path: str | Path, hint: str, device: torch.device | str = "cpu"):
    """``diffusers.<class_name>.from_pretrained(path)`` offline, frozen in eval mode; a missing directory is a
    ``FileNotFoundError`` naming it and where the weights are published (``hint``)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no {class_name} at {path} (config.json missing): download the diffusers "
                                f"folder of {hint}, on a machine with network access")
    return diffusers_from_pretrained(class_name, path).to(device).eval().requires_grad_(False)


def patchify_2x2(z: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` → ``(B, 4C, H/2, W/2)``, channel order ``(c, pi, pj)``."""
    b, c, h, w = z.shape
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def unpatchify_2x2(z: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`patchify_2x2`."""
    b, c4, h, w = z.shape
    return z.view(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c4 // 4, h * 2, w * 2)


class Flux2AE(NormalizedVAE):
    """Encode/decode with a frozen ``AutoencoderKLFlux2`` in the patchified, BN-normalised space
    (``latent_channels`` = 4 × raw, ``downsample`` = 2 × the VAE's); plugs into ``sd_vae.LatentCodec``."""

    def __init__(self, vae):
        super().__init__(vae)
        self.eps = float(vae.config.batch_norm_eps)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: torch.device | str = "cpu") -> Flux2AE:
        return cls(load_local_diffusers("AutoencoderKLFlux2", path, FLUX2_HINT, device))

    @property
    def latent_channels(self) -> int:
        return 4 * int(self.vae.config.latent_channels)

    @property
    def downsample(self) -> int:
        return 2 ** len(self.vae.config.block_out_channels)  # VAE's 2^(levels−1), times the 2×2 patch

    def latent_stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The checkpoint's BatchNorm running statistics, ``(1, 128, 1, 1)`` fp32."""
        mean = self.vae.bn.running_mean.view(1, -1, 1, 1).to(z.device, torch.float32)
        std = torch.sqrt(self.vae.bn.running_var.view(1, -1, 1, 1).to(z.device, torch.float32) + self.eps)
        return mean, std

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw posterior mean ``(B, 32, h, w)`` → model space ``(B, 128, h/2, w/2)``."""
        return super().normalize(patchify_2x2(raw.float()))

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Model space ``(B, 128, h', w')`` → raw ``(B, 32, 2h', 2w')``."""
        return unpatchify_2x2(super().denormalize(z.float()))


def convert_flux2_ae_single_file(state_dict: dict[str, torch.Tensor],
                                 num_blocks: int | None = None) -> dict[str, torch.Tensor]:
    """BFL's single-file FLUX.2 ``ae.safetensors`` state dict → ``AutoencoderKLFlux2`` keys.

    diffusers 0.42 has no single-file mapping for this class (``from_single_file`` fails). BFL's layout is the
    LDM one except that ``quant_conv`` lives in ``encoder.`` and ``post_quant_conv`` in ``decoder.``; so those
    two move to the top level and the rest goes through diffusers' ``convert_ldm_vae_checkpoint`` (1×1-conv
    attention → linear, ``up.{n-1-i}`` → ``up_blocks.{i}``); ``bn.*`` (the BatchNorm statistics) is kept.
    ``num_blocks`` (resolution levels, 4 for FLUX.2) is read from the keys when not given.
    """
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    sd = dict(state_dict)
    for old, new in (("encoder.quant_conv.", "quant_conv."), ("decoder.post_quant_conv.", "post_quant_conv.")):
        for k in [k for k in sd if k.startswith(old)]:
            sd[new + k[len(old):]] = sd.pop(k)
    if num_blocks is None:
        num_blocks = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.down."))
    out = convert_ldm_vae_checkpoint(sd, {"down_block_types": [None] * num_blocks,
                                          "up_block_types": [None] * num_blocks})
    out.update({k: v for k, v in sd.items() if k.startswith("bn.")})
    return out
