"""The image modality: synthetic shapes (embedded default) or prepared ImageNet latent shards; pixel space or
the SD-VAE; optional REPA target features; PNG grids, per-sample PNGs and ADM arrays."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from selfflow.core.indexed_stream import IndexedStream
from selfflow.core.mmdit import Conditioning
from selfflow.core.modality import Batch, DataStream, Modality
from selfflow.core.registry import register_modality
from selfflow.core.tokens import Tokens, grid_ids
from selfflow.text.conditioning import CaptionConditioner, CaptionedModalityMixin
from selfflow.text.encoder import TextEncoderOptions

from .grid import save_grid, to_uint8
from .pixel_codec import PixelCodec
from .synthetic_shapes import CAPTIONS, CLASS_NAMES, render_batch


class ImageOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset: Literal["synthetic_shapes", "latent_shards"] = "synthetic_shapes"
    codec: Literal["pixel", "sd_vae", "flux2", "rae"] = "pixel"
    image_size: int = Field(32, ge=8)
    patch_size: int = Field(4, ge=1)
    data_seed: int = Field(0, description="which synthetic stream (independent of the training seed)")
    conditioning: Literal["class", "text"] = Field("class", description="synthetic shapes: labels or captions")
    text: TextEncoderOptions = Field(default_factory=TextEncoderOptions)
    vae_path: str | None = Field(None, description="local diffusers directory: AutoencoderKL (sd_vae), "
                                 "AutoencoderKLFlux2 (flux2) or AutoencoderRAE (rae)")
    scaling_factor: float = Field(0.18215, gt=0, description="SD-VAE latent scale")
    shards: str | None = Field(None, description="latent_shards: directory or glob of prepared *.tar shards")
    num_classes: int = Field(1000, ge=0, description="latent_shards: number of classes (ImageNet 1000)")
    flip: bool = Field(False, description="latent_shards: use the stored mirrored moments half the time")
    num_workers: int = Field(0, ge=0, description="latent_shards: data-loader workers per rank")
    shuffle_buffer: int = Field(1000, ge=1, description="latent_shards: samples in the shuffle buffer")
    repa_encoder: str | None = Field(None, description="local DINOv2 directory: REPA target features")
    repa_resolution: int = Field(224, ge=14, description="REPA encoder input size (224 → 16×16 tokens)")
    device: str = Field("auto", description="where the VAE / REPA encoder run (auto: CUDA if available)")


@register_modality
class ImageModality(CaptionedModalityMixin, Modality):
    name = "image"
    Options = ImageOptions
    default_mask_ratio = 0.25

    def __init__(self, options: dict[str, Any] | BaseModel | None = None):
        super().__init__(options)
        o = self.options
        if o.dataset == "latent_shards" and (o.codec != "sd_vae" or not o.shards):
            raise ValueError("dataset latent_shards needs codec: sd_vae and shards: <dir or glob>")
        auto = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(auto if o.device == "auto" else o.device)
        if o.codec != "pixel":
            if not o.vae_path:
                raise ValueError(f"codec {o.codec} needs vae_path (a local diffusers autoencoder directory)")
            from .sd_vae import SDVAE, LatentCodec

            if o.codec == "flux2":
                from .flux2_ae import Flux2AE

                vae = Flux2AE.from_pretrained(o.vae_path, self.device)
            elif o.codec == "rae":
                from .rae import RAE

                vae = RAE.from_pretrained(o.vae_path, self.device)
                if o.image_size != vae.image_size:
                    raise ValueError(f"codec rae needs image_size {vae.image_size} (its decoder's output size)")
            else:
                vae = SDVAE.from_pretrained(o.vae_path, self.device, o.scaling_factor)
            self.codec = LatentCodec(vae, o.image_size, o.patch_size)
        else:
            self.codec = PixelCodec(o.image_size, o.patch_size)
        if o.conditioning == "text" and o.dataset != "synthetic_shapes":
            raise ValueError("conditioning: text is available for the synthetic shapes (captions); prepared "
                             "ImageNet shards are class-conditional")
        names = CLASS_NAMES if o.dataset == "synthetic_shapes" else [str(i) for i in range(o.num_classes)]
        self.conditioner = CaptionConditioner(o.conditioning, CAPTIONS if o.conditioning == "text" else names,
                                              o.text)
        self.repa = None
        if o.repa_encoder:
            from .repa_encoder import RepaEncoder

            self.repa = RepaEncoder(o.repa_encoder, o.repa_resolution, self.device)

    @property
    def token_channels(self) -> int:
        return self.codec.token_channels

    @property
    def evaluator(self) -> str | None:
        return "shapes_probe" if self.options.dataset == "synthetic_shapes" else None

    def stream(self, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> DataStream:
        o = self.options
        if o.dataset == "latent_shards":
            from .latent_shards import LatentShardStream, list_shards

            return LatentShardStream(list_shards(o.shards), batch_size, seed, rank, world_size, flip=o.flip,
                                     scale=o.scaling_factor, pixels=self.repa is not None,
                                     num_workers=o.num_workers, shuffle_buffer=o.shuffle_buffer)

        def render(indices: range) -> Batch:
            images, labels = render_batch(o.data_seed, indices, o.image_size)
            return {"media": images, "labels": labels, "captions": [CAPTIONS[i] for i in labels.tolist()]}

        return IndexedStream(render, batch_size, rank, world_size)

    def encode(self, batch: Batch, device: torch.device | str) -> tuple[Tokens, Conditioning]:
        """Latent batches (prepared shards) are patchified; pixel batches go through the codec. With a REPA
        encoder, its per-patch features of the pixels become ``tokens.target``."""
        if "latents" in batch:
            tokens = self.codec.latents_to_tokens(batch["latents"].to(device))
        else:
            where = self.device if self.options.codec != "pixel" else device
            tk = self.codec.to_tokens(batch["media"].to(where))
            tokens = Tokens(tk.x.to(device), tk.ids.to(device))
        if self.repa is not None:
            pixels = batch["pixels"] if "pixels" in batch else batch["media"]
            tokens.target = self.repa(pixels).to(device)
        return tokens, self.conditioner.from_batch(batch, device)

    def sample_ids(self, n: int, device: torch.device | str) -> torch.Tensor:
        return grid_ids(*self.codec.grid, batch=n, device=device)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return self.codec.from_tokens(x).clamp(-1, 1)

    def save_samples(self, media: torch.Tensor, labels: torch.Tensor | None, path: Path) -> Path:
        return save_grid(media, Path(path).with_suffix(".png"), labels, self.class_names)

    def write_sample(self, media: torch.Tensor, label: int | None, path: Path) -> Path:
        """One image at its own resolution as ``<path>.png``."""
        path = Path(path).with_suffix(".png")
        Image.fromarray(to_uint8(media[None])[0]).save(path)
        return path

    def evaluation_array(self, media: torch.Tensor) -> np.ndarray:
        """uint8 ``(B, H, W, 3)``: the rows of ADM's ``arr_0``."""
        return to_uint8(media)


def load_official_for_sampling(path: str | Path, options: dict[str, Any]):
    """``selfflow.checkpoints`` loader: the released Self-Flow checkpoint, an SD-VAE image modality and the
    official sampler defaults (SDE, 250 model calls, no CFG; guidance interval t ≤ 0.7 if CFG is asked for)."""
    from selfflow.core.sampler import SamplerConfig

    from .official import load_official_selfflow

    if options.get("vae") is None:
        raise ValueError("--official-ckpt needs --vae DIR (a local stabilityai/sd-vae-ft-ema AutoencoderKL)")
    device = options.get("device", "cpu")
    modality = ImageModality({"codec": "sd_vae", "vae_path": str(options["vae"]), "image_size": 256,
                              "patch_size": 2, "device": str(device)})
    modality.options.num_classes = 1000  # ImageNet labels (the synthetic dataset is never read here)
    modality.options.dataset = "latent_shards"
    modality.conditioner = CaptionConditioner("class", [str(i) for i in range(1000)], modality.options.text)
    model = load_official_selfflow(path, device)
    return model, modality, SamplerConfig(solver="sde", steps=250, cfg_scale=1.0, guidance_interval=(0.0, 0.7))
