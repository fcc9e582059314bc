"""The image modality: synthetic shapes (embedded default), scikit-learn's digits (embedded), prepared ImageNet
latent shards (class labels) or prepared image-text shards (captions); pixel space, SD-VAE, FLUX.2 or RAE
latents; optional REPA target features (DINOv2, or the toy encoder on the embedded datasets); PNG grids,
per-sample PNGs and ADM arrays."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from selfflow.core.codec import shapes_only_active, stands_in
from selfflow.core.data.indexed_stream import IndexedStream
from selfflow.core.data.shard_format import read_codec_info, required_shard_urls
from selfflow.core.data.shard_stream import ShardReadOptions, ShardStream
from selfflow.core.modality import (
    Batch,
    DataStream,
    Modality,
    data_location,
    model_location,
    options_union,
)
from selfflow.core.registry import register_modality
from selfflow.core.sample_many import part_path
from selfflow.core.timesteps import TimestepDistribution
from selfflow.core.tokens import Conditioning, Tokens, grid_ids
from selfflow.text.conditioning import CaptionConditioner, CaptionedModalityMixin
from selfflow.text.encoder import TextEncoderOptions

from . import digits
from .codecs import CodecName, build_codec, default_timesteps
from .grid import save_grid, to_uint8
from .sd_vae import LatentCodec
from .synthetic_shapes import CAPTIONS, CLASS_NAMES, render_batch
from .toy_encoder import ToyRepaEncoder


class _CommonImageOptions(BaseModel):
    """Options every image dataset takes."""

    model_config = ConfigDict(extra="forbid")

    codec: CodecName = "pixel"
    image_size: int = Field(32, ge=8)
    patch_size: int = Field(4, ge=1)
    conditioning: Literal["class", "text"] | None = Field(
        None, description="None: text for image_text_shards, else class; synthetic shapes: labels or captions")
    text: TextEncoderOptions = Field(default_factory=TextEncoderOptions)
    vae_path: str | None = model_location("local diffusers directory: AutoencoderKL (sd_vae), "
                                 "AutoencoderKLFlux2 (flux2) or AutoencoderRAE (rae)")
    scaling_factor: float = Field(0.18215, gt=0, description="SD-VAE latent scale")
    repa_encoder: str | None = model_location("local DINOv2 directory: REPA target features; toy: a "
                                     "small CNN trained once on the built-in dataset (synthetic_shapes, digits)")
    toy_repa_dim: int = Field(128, ge=1, description="feature width of the toy REPA encoder (the model width)")
    repa_resolution: int = Field(224, ge=14, description="REPA encoder input size (224 → 16×16 tokens)")
    device: str = Field("auto", description="where the VAE / REPA encoder run (auto: CUDA if available)")


class SyntheticShapesOptions(_CommonImageOptions):
    """The built-in coloured shapes, rendered on the fly (the embedded default)."""

    dataset: Literal["synthetic_shapes"] = "synthetic_shapes"
    data_seed: int = Field(0, description="which synthetic stream (independent of the training seed)")


class DigitsOptions(_CommonImageOptions):
    """scikit-learn's handwritten digits (embedded, fixed 1,500 / 297 split; runs train on the 1,500)."""

    dataset: Literal["digits"]
    image_size: int = Field(16, ge=8)
    patch_size: int = Field(2, ge=1)
    data_seed: int = Field(0, description="order of the training split's epochs")


class _ShardOptions(_CommonImageOptions, ShardReadOptions):
    pass


class ImageNetShardsOptions(_ShardOptions):
    """``selfflow prepare imagenet`` output: latents (or SD-VAE moments) with class labels."""

    dataset: Literal["latent_shards"]
    shards: str = data_location("directory of prepared *.tar shards, or a glob")
    num_classes: int = Field(1000, ge=0, description="number of classes (ImageNet 1000)")
    flip: bool = Field(False, description="use the stored mirrored moments / latents half the time")


class ImageTextShardsOptions(_ShardOptions):
    """``selfflow prepare image-text`` output: latents with captions and caption embeddings."""

    dataset: Literal["image_text_shards"]
    shards: str = data_location("directory of prepared *.tar shards")
    sample_captions: list[str] | None = Field(
        None, description="preview prompts (None: the captions recorded in codec.json)")


ImageOptions = options_union("dataset", "synthetic_shapes", SyntheticShapesOptions, DigitsOptions,
                             ImageNetShardsOptions, ImageTextShardsOptions)
BUILT_IN = ("synthetic_shapes", "digits")  # embedded, labelled datasets: probes and the toy REPA encoder


@register_modality
class ImageModality(CaptionedModalityMixin, Modality):
    name = "image"
    Options = ImageOptions
    default_mask_ratio = 0.25

    def __init__(self, options: dict[str, Any] | BaseModel | None = None):
        super().__init__(options)
        o = self.options
        auto = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(auto if o.device == "auto" else o.device)
        self.shard_info = self._read_shard_info()
        self.codec = build_codec(o.codec, o.vae_path, o.image_size, o.patch_size, self.device, o.scaling_factor)
        self._check_latent_shape()
        mode = o.conditioning or ("text" if o.dataset == "image_text_shards" else "class")
        if mode == "text" and o.dataset == "latent_shards":
            raise ValueError("prepared ImageNet shards (latent_shards) are class-conditional: for captions use "
                             "`selfflow prepare image-text` and dataset: image_text_shards")
        if o.dataset == "synthetic_shapes":
            names, captions = CLASS_NAMES, CAPTIONS
        elif o.dataset == "digits":
            names, captions = digits.CLASS_NAMES, digits.CAPTIONS
        else:
            names = [str(i) for i in range(o.num_classes)] if isinstance(o, ImageNetShardsOptions) else []
            given = o.sample_captions if isinstance(o, ImageTextShardsOptions) else None
            captions = given or self.shard_info.get("sample_captions") or [""]
        self.conditioner = CaptionConditioner(mode, captions if mode == "text" else names, o.text,
                                              captions if o.dataset == "image_text_shards" else None)
        self.check_stored_captions(self.shard_info, getattr(self.options, "shards", ""))
        self.repa = None
        if o.repa_encoder == "toy":
            self.repa = self._toy_repa(len(names))
        elif o.repa_encoder and not stands_in(o.repa_encoder):  # (shapes_only: the targets are data, not model)
            from .repa_encoder import RepaEncoder

            self.repa = RepaEncoder(o.repa_encoder, o.repa_resolution, self.device)

    def _toy_repa(self, num_classes: int) -> ToyRepaEncoder:
        o = self.options
        if o.dataset not in BUILT_IN or o.codec != "pixel":
            raise ValueError(f"data.options.repa_encoder: toy needs a built-in dataset ({', '.join(BUILT_IN)}) in "
                             f"pixel space, got dataset {o.dataset} with codec {o.codec}")
        _, h, _ = self.codec.grid
        return ToyRepaEncoder(o.dataset, o.image_size, h, num_classes, o.data_seed, o.toy_repa_dim, self.device)

    def _read_shard_info(self) -> dict[str, Any]:
        """The shard directory's ``codec.json``, whose codec must be the configured one ({} for synthetic
        data, and when it is absent: SD-VAE shards from before it existed, or sampling away from the shards)."""
        o = self.options
        if o.dataset in BUILT_IN:
            return {}
        if o.dataset == "latent_shards" and o.codec == "pixel":
            raise ValueError("dataset latent_shards needs codec: sd_vae, flux2 or rae (the prepared codec)")
        root = Path(o.shards)
        folder = root if root.is_dir() else root.parent  # latent_shards may name a glob
        info = read_codec_info(folder, "image-text", required=False)  # absence is handled here
        if info is None:
            path = folder / "codec.json"
            if isinstance(o, ImageTextShardsOptions) and o.sample_captions is None and not shapes_only_active():
                what = (f"{path} not found: is {o.shards} a `selfflow prepare image-text` output?" if root.exists()
                        or any(c in str(root) for c in "*?[") else f"data.options.shards: {o.shards} does not exist")
                raise FileNotFoundError(f"{what} (to sample without the shards, set data.options.sample_captions)")
            # sampling a trained run where its shards are absent, or SD-VAE shards from before codec.json:
            # nothing to check against (a wrong codec then fails on the first batch's shape)
            return {}
        if info.get("codec") != o.codec:
            raise ValueError(f"{o.shards} holds {info.get('codec')} latents but data.options.codec is {o.codec}")
        return info

    def _check_latent_shape(self) -> None:
        shape = self.shard_info.get("latent_shape")
        if shape is None:
            return
        c, h, _ = shape
        if isinstance(self.codec, LatentCodec):
            expected = (self.codec.vae.latent_channels, self.codec.latent_size)
        else:
            expected = (self.codec.channels, self.codec.image_size)
        if (c, h) != expected:
            raise ValueError(f"{self.options.shards} holds latents of shape {shape}, but codec "
                             f"{self.options.codec} at image_size {self.options.image_size} makes "
                             f"({expected[0]}, {expected[1]}, {expected[1]}): set image_size to the prepared "
                             f"size ({self.shard_info.get('image_size')})")

    @property
    def token_channels(self) -> int:
        return self.codec.token_channels

    @property
    def default_timesteps(self) -> TimestepDistribution:  # type: ignore[override]
        """Depends on the codec (:func:`.codecs.default_timesteps`): uniform in pixel and SD-VAE space."""
        o = self.options
        if isinstance(self.codec, LatentCodec):
            c, s = self.codec.vae.latent_channels, self.codec.latent_size
            return default_timesteps(o.codec, (c, s, s))
        return default_timesteps(o.codec, (3, o.image_size, o.image_size))

    @property
    def evaluator(self) -> str | None:
        return {"synthetic_shapes": "shapes_probe", "digits": "digits_probe"}.get(self.options.dataset)

    def stream(self, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> DataStream:
        o = self.options
        if o.dataset == "latent_shards":
            from .latent_shards import imagenet_stream

            return imagenet_stream(o.shards, batch_size, seed, rank, world_size, flip=o.flip,
                                   scale=o.scaling_factor, pixels=self.repa is not None, num_classes=o.num_classes,
                                   num_workers=o.num_workers, shuffle_buffer=o.shuffle_buffer)
        if o.dataset == "image_text_shards":
            return ShardStream(required_shard_urls(o.shards, "image-text"), batch_size, seed=seed, rank=rank,
                               world_size=world_size, num_workers=o.num_workers, shuffle_buffer=o.shuffle_buffer)
        if o.dataset == "digits":
            def render(indices: range) -> Batch:
                images, labels = digits.digits_batch(o.data_seed, indices, o.image_size)
                return {"media": images, "labels": labels,
                        "captions": [digits.CAPTIONS[i] for i in labels.tolist()]}

            return IndexedStream(render, batch_size, rank, world_size)

        def render(indices: range) -> Batch:
            images, labels = render_batch(o.data_seed, indices, o.image_size)
            return {"media": images, "labels": labels, "captions": [CAPTIONS[i] for i in labels.tolist()]}

        return IndexedStream(render, batch_size, rank, world_size)

    def encode(self, batch: Batch, device: torch.device | str) -> tuple[Tokens, Conditioning]:
        """Latent batches (prepared shards: ``latents`` from ImageNet, model-space ``latent`` from image-text)
        are patchified; pixel batches go through the codec. With a REPA encoder, its per-patch features of the
        pixels become ``tokens.target``."""
        stored = batch.get("latents", batch.get("latent"))
        if stored is not None and self.options.codec == "pixel":
            tokens = self.codec.to_tokens(stored.to(device))  # prepared pixels are their own latents
        elif stored is not None:
            tokens = self.codec.latents_to_tokens(stored.to(device))
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
        """A grid ``<path>.png``; a text-conditioned run's captions beside it in ``<path>.txt`` (as video and audio
        previews have them), one ``i: caption`` line per sample."""
        grid = save_grid(media, Path(path).with_suffix(".png"), labels, self.class_names)
        if self.context_dim and labels is not None:
            self.write_captions(labels, grid)
        return grid

    def write_sample(self, media: torch.Tensor, label: int | None, path: Path) -> Path:
        """One image at its own resolution as ``<path>.png``."""
        path = Path(path).with_suffix(".png")
        Image.fromarray(to_uint8(media[None])[0]).save(path)
        return path

    def evaluation_array(self, media: torch.Tensor) -> np.ndarray:
        """uint8 ``(B, H, W, 3)``: the rows of ADM's ``arr_0``."""
        return to_uint8(media)

    def evaluation_hint(self, out_dir: Path, npz: Path | None, paired: bool) -> str | None:
        if paired:
            return (f"evaluate with (CLIP score of the prompts in prompts.jsonl; FD-DINOv2 against --ref):\n"
                    f"  selfflow eval t2i --images {out_dir} --clip CLIP_DIR --dinov2 DINOV2_DIR --ref REF_IMAGES")
        if npz is None:
            return None
        shape = np.load(part_path(out_dir, 0), mmap_mode="r").shape  # (B, H, W, 3) rows of the npz, not read
        if self.num_classes == 1000 and shape[1:] == (256, 256, 3):
            return ("evaluate with (ImageNet 256; ADM's reference batch):\n"
                    f"  selfflow eval adm VIRTUAL_imagenet256_labeled.npz {npz}")
        return (f"evaluate with (a reference batch of your data's images at {shape[1]}x{shape[2]}: selfflow eval "
                f"stats REAL_IMAGES --out ref.npz):\n  selfflow eval adm ref.npz {npz}")


def load_official_for_sampling(path: str | Path, options: dict[str, Any]):
    """``selfflow.checkpoints`` loader: the released Self-Flow checkpoint, an SD-VAE image modality and the
    official sampler defaults (SDE, 250 model calls, no CFG; guidance interval t ≤ 0.7 if CFG is asked for)."""
    from selfflow.core.sampler import SamplerConfig

    from .official import check_checkpoint_file, load_official_selfflow

    check_checkpoint_file(path)  # before the VAE loads: a missing checkpoint was named only after it
    if options.get("vae") is None:
        raise ValueError("--official-ckpt needs --vae DIR (a local stabilityai/sd-vae-ft-ema AutoencoderKL)")
    device = options.get("device", "cpu")
    modality = ImageModality({"codec": "sd_vae", "vae_path": str(options["vae"]), "image_size": 256,
                              "patch_size": 2, "device": str(device)})
    # ImageNet labels; no shards are read here (model_construct: ``shards`` stays unset)
    common = {k: getattr(modality.options, k) for k in _CommonImageOptions.model_fields}
    modality.options = ImageNetShardsOptions.model_construct(**common, dataset="latent_shards", num_classes=1000)
    modality.conditioner = CaptionConditioner("class", [str(i) for i in range(1000)], modality.options.text)
    model = load_official_selfflow(path, device)
    return model, modality, SamplerConfig(solver="sde", steps=250, cfg_scale=1.0, guidance_interval=(0.0, 0.7))
