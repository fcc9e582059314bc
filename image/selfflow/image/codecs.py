"""Choosing an image codec by name: the one place that maps ``pixel | sd_vae | flux2 | rae`` to an object.

The modality (on-the-fly encoding and decoding of samples), ``selfflow prepare imagenet`` and ``selfflow
prepare image-text`` all build their codec here, so a prepared latent and a latent encoded during training
come from the same code path and live in the same *model space*: SD-VAE latents scaled by 0.18215, FLUX.2
latents patchified 2×2 and BatchNorm-normalised, RAE latents normalised by the checkpoint's statistics,
pixels in [-1, 1]. Under :func:`selfflow.core.codec.shapes_only` a missing autoencoder folder stands in as
its published shape (:data:`PUBLISHED_SHAPES`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from selfflow.core.codec import CodecShape, stands_in
from selfflow.core.timesteps import TimestepDistribution, dimension_shift

from .flux2_ae import Flux2AE
from .pixel_codec import PixelCodec
from .rae import RAE
from .sd_vae import SD_VAE_SCALE, SDVAE, LatentCodec

CodecName = Literal["pixel", "sd_vae", "flux2", "rae"]
Autoencoder = SDVAE | Flux2AE | RAE


@dataclass(frozen=True)
class RAEShape(CodecShape):
    image_size: int = 256  # the decoder's output size, the only one that round-trips (see rae.RAE.image_size)


# The model-space latents of the published checkpoints (their config.json; shared/reference/modality-anchors.md):
# SD-VAE 4 channels at 1/8; FLUX.2 32 raw channels at 1/8, 2×2-patchified to 128 at 1/16; RAE's DINOv2-B encoder
# 768 channels, one per 16 output pixels (224 px in, patch 14 → 16×16 → 256 px out).
PUBLISHED_SHAPES: dict[str, CodecShape] = {
    "sd_vae": CodecShape("SD-VAE (stabilityai/sd-vae-ft-ema)", latent_channels=4, downsample=8),
    "flux2": CodecShape("FLUX.2 autoencoder (black-forest-labs/FLUX.2-dev vae/)", latent_channels=128, downsample=16),
    "rae": RAEShape("RAE (nyu-visionx/RAE-dinov2-wReg-base-ViTXL-n08)", latent_channels=768, downsample=16),
}

CLI_NAMES = {"sd-vae": "sd_vae", "sd_vae": "sd_vae", "flux2": "flux2", "rae": "rae", "pixel": "pixel"}


def codec_name(name: str) -> str:
    """CLI spelling (``sd-vae``) → config spelling (``sd_vae``); unknown names are an error."""
    if name not in CLI_NAMES:
        raise ValueError(f"unknown image codec {name!r}: choose sd-vae, flux2, rae or pixel")
    return CLI_NAMES[name]


def load_autoencoder(codec: str, path: str | Path | None, device: torch.device | str = "cpu",
                     scaling_factor: float = SD_VAE_SCALE) -> Autoencoder | CodecShape:
    """The frozen autoencoder of ``codec`` (``sd_vae``, ``flux2`` or ``rae``) from a local diffusers folder (its
    published shape under ``shapes_only()`` when the folder is absent)."""
    codec = codec_name(codec)
    if codec == "pixel":
        raise ValueError("codec pixel has no autoencoder")
    if stands_in(path):
        return PUBLISHED_SHAPES[codec]
    if not path:
        raise ValueError(f"codec {codec} needs a local diffusers autoencoder directory: data.options.vae_path "
                         "(training) or --vae-dir (prepare)")
    if codec == "flux2":
        return Flux2AE.from_pretrained(path, device)
    if codec == "rae":
        return RAE.from_pretrained(path, device)
    return SDVAE.from_pretrained(path, device, scaling_factor)


def build_codec(codec: str, vae_path: str | Path | None, image_size: int, patch_size: int,
                device: torch.device | str = "cpu", scaling_factor: float = SD_VAE_SCALE
                ) -> PixelCodec | LatentCodec:
    """Images ↔ tokens for ``codec``; RAE only works at its decoder's output size, checked here."""
    codec = codec_name(codec)
    if codec == "pixel":
        return PixelCodec(image_size, patch_size)
    vae = load_autoencoder(codec, vae_path, device, scaling_factor)
    check_image_size(vae, image_size)
    return LatentCodec(vae, image_size, patch_size)


def check_image_size(vae: Autoencoder | CodecShape, image_size: int) -> None:
    """RAE's encoder resizes any input to its own size, so only the decoder's output size round-trips."""
    if isinstance(vae, RAE | RAEShape) and image_size != vae.image_size:
        assumed = " — the published RAE's, assumed because its folder is absent" if isinstance(vae, RAEShape) else ""
        raise ValueError(f"codec rae needs image_size {vae.image_size} (its decoder's output size{assumed})")


def latent_shape(vae: Autoencoder | None, image_size: int) -> tuple[int, int, int]:
    """``(C, h, w)`` of one image's model-space latent (pixels: the image itself)."""
    if vae is None:
        return (3, image_size, image_size)
    s = image_size // vae.downsample
    return (vae.latent_channels, s, s)


def name_of(vae: Autoencoder | None) -> str:
    """The codec name of an autoencoder object (``None``: pixels)."""
    if vae is None:
        return "pixel"
    return {SDVAE: "sd_vae", Flux2AE: "flux2", RAE: "rae"}[type(vae)]


def default_timesteps(codec: str, latent: tuple[int, int, int]) -> TimestepDistribution:
    """The paper's training-time distribution for a codec's latents ``(C, h, w)`` (docs/FIDELITY.md, the
    recipes in configs/imagenet256/): uniform for pixels and SD-VAE; logit-normal with the dimension
    shift ``sqrt(C·h·w / 4096)`` for FLUX.2 (√8 at 256 px); RAE's plateau-logit-normal with that train shift
    (≈ 6.93 at 256 px). A config's ``objective.timesteps`` overrides it."""
    shift = dimension_shift(latent[0] * latent[1] * latent[2])
    if codec == "flux2":
        return TimestepDistribution(kind="logit_normal", mean=0.0, std=1.0, shift=shift)
    if codec == "rae":
        return TimestepDistribution(kind="plateau_logit_normal", mean=0.0, std=1.0, plateau=0.1, shift=shift)
    return TimestepDistribution()
