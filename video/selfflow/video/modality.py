"""The video modality: moving shapes (embedded default, pixel space) or prepared Wan latents; MP4/GIF.

Defaults for Self-Flow: mask ratio R_M = 0.1 (paper), logit-normal timesteps with a shift towards noise
(the paper searched the video shift; 3.0 here, override with ``objective.timesteps``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt

from selfflow.core.codec import stands_in
from selfflow.core.data.indexed_stream import IndexedStream
from selfflow.core.data.shard_format import check_shard_record, read_codec_info, required_shard_urls
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
from selfflow.core.sampler import SamplerSettings
from selfflow.core.timesteps import TimestepDistribution
from selfflow.core.tokens import Conditioning, Tokens, grid_ids, patchify, unpatchify
from selfflow.text.conditioning import CaptionConditioner, CaptionedModalityMixin
from selfflow.text.encoder import TextEncoderOptions

from .pixel_codec import VideoPixelCodec
from .synthetic_moving_shapes import CAPTIONS, render_batch
from .writer import save_clip_frames, save_video_samples


class _CommonVideoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    codec: Literal["pixel", "wan2.2", "wan2.1"] = Field("pixel", description="latent_shards: a Wan VAE")
    frames: int = Field(8, ge=1, description="clip frames (4k+1 with a Wan codec)")
    image_size: int = Field(32, ge=8, description="clip height = width")
    patch: tuple[PositiveInt, PositiveInt, PositiveInt] | None = Field(
        None, description="(pt, ph, pw); None: pixel (2,4,4), Wan (1,2,2)")
    conditioning: Literal["class", "text"] | None = Field(None, description="None: class (synthetic), text (shards)")
    text: TextEncoderOptions = Field(default_factory=TextEncoderOptions)
    sample_captions: list[str] | None = Field(None, description="preview prompts (None: the prepared shards' own captions, else the synthetic ones)")
    vae_dir: str | None = model_location("Wan codec: local diffusers-format vae/ directory")
    fps: int = Field(8, ge=1, description="of written samples")


class SyntheticMovingShapesOptions(_CommonVideoOptions):
    dataset: Literal["synthetic_moving_shapes"] = "synthetic_moving_shapes"
    data_seed: int = Field(0, description="which synthetic stream (independent of the training seed)")


class VideoShardsOptions(_CommonVideoOptions, ShardReadOptions):
    dataset: Literal["latent_shards"]
    shards: str = data_location("directory written by `selfflow prepare video`")


VideoOptions = options_union("dataset", "synthetic_moving_shapes", SyntheticMovingShapesOptions, VideoShardsOptions)


@register_modality
class VideoModality(CaptionedModalityMixin, Modality):
    name = "video"
    Options = VideoOptions
    default_mask_ratio = 0.1
    default_timesteps = TimestepDistribution(kind="logit_normal", mean=0.0, std=1.0, shift=3.0)
    default_sampler = SamplerSettings(shift=default_timesteps.shift)  # sample at the training shift

    def __init__(self, options: dict[str, Any] | BaseModel | None = None):
        super().__init__(options)
        o = self.options
        self.shard_info: dict[str, Any] = {}
        if o.dataset == "latent_shards":
            if o.codec == "pixel":
                raise ValueError("dataset 'latent_shards' needs a Wan codec (codec: wan2.2 | wan2.1)")
            self.shard_info = self._read_shard_info()
            check_shard_record(self.shard_info, o.shards, "video", latent_dims=4, codec_key="version", codec=o.codec)
        self.patch = tuple(o.patch or ((2, 4, 4) if o.codec == "pixel" else (1, 2, 2)))
        if self.shard_info.get("latent_shape"):  # a patch larger than the latent made no token at all
            _, *thw = self.shard_info["latent_shape"]
            if any(n % p for n, p in zip(thw, self.patch)):
                raise ValueError(f"data.options.patch {list(self.patch)} does not divide the shards' latent (T, H, W) "
                                 f"= {tuple(thw)} (codec.json): e.g. patch [1, 2, 2]")
        self.pixel = VideoPixelCodec(o.frames, o.image_size, self.patch) if o.codec == "pixel" else None
        self._wan = None
        if self.pixel is None and o.dataset != "latent_shards":
            self.wan  # noqa: B018 - on-the-fly encoding needs the VAE now (fails early if missing)
        mode = o.conditioning or ("class" if o.dataset == "synthetic_moving_shapes" else "text")
        # previews: the options' captions, else the shards' own (codec.json), else the synthetic ones
        self.conditioner = CaptionConditioner(mode, CAPTIONS, o.text,
                                              o.sample_captions or self.shard_info.get("sample_captions"))
        self.check_stored_captions(self.shard_info, getattr(o, "shards", ""))

    def _read_shard_info(self) -> dict[str, Any]:
        """``codec.json`` of the shards; under ``shapes_only()`` without it, the latent shape of the clip that
        ``selfflow prepare video`` makes by default (the paper's 45 frames at 192×320)."""
        o = self.options
        if stands_in(o.shards, "codec.json"):
            from .clips import ClipSpec

            clip = ClipSpec()
            return {"latent_shape": list(self.published_wan.latent_shape(clip.frames, clip.height, clip.width))}
        return read_codec_info(o.shards, "video")

    # --- codec ------------------------------------------------------------------------------------
    @property
    def published_wan(self):
        from .wan_codec import PUBLISHED_SHAPES

        return PUBLISHED_SHAPES[self.options.codec]

    @property
    def wan(self):
        if self._wan is None and stands_in(self.options.vae_dir):
            self._wan = self.published_wan
        if self._wan is None:
            from .wan_codec import WanCodec

            if not self.options.vae_dir:
                raise ValueError(f"codec {self.options.codec!r} needs data.options.vae_dir (a local vae/ folder)")
            self._wan = WanCodec.from_pretrained(self.options.vae_dir, self.options.codec)
        return self._wan

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """``(C, T, H, W)`` of one sample before patchify."""
        o = self.options
        if self.pixel is not None:
            return (3, o.frames, o.image_size, o.image_size)
        if self.shard_info:
            return tuple(self.shard_info["latent_shape"])
        return self.wan.latent_shape(o.frames, o.image_size, o.image_size)

    @property
    def grid(self) -> tuple[int, int, int]:
        _, t, h, w = self.latent_shape
        return (t // self.patch[0], h // self.patch[1], w // self.patch[2])

    @property
    def token_channels(self) -> int:
        return self.latent_shape[0] * self.patch[0] * self.patch[1] * self.patch[2]

    # --- data -------------------------------------------------------------------------------------
    def stream(self, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> DataStream:
        o = self.options
        if o.dataset == "latent_shards":
            return ShardStream(required_shard_urls(o.shards, "video"), batch_size, seed=seed, rank=rank,
                               world_size=world_size, num_workers=o.num_workers, shuffle_buffer=o.shuffle_buffer)

        def render(indices: range) -> Batch:
            media, labels, captions = render_batch(o.data_seed, indices, o.frames, o.image_size)
            return {"media": media, "labels": labels, "captions": captions}

        return IndexedStream(render, batch_size, rank, world_size)

    def _normalize_raw(self, z: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.shard_info["latent_mean"], device=z.device).view(1, -1, 1, 1, 1)
        std = torch.tensor(self.shard_info["latent_std"], device=z.device).view(1, -1, 1, 1, 1)
        return (z - mean) / std

    def encode(self, batch: Batch, device: torch.device | str) -> tuple[Tokens, Conditioning]:
        if "latent" in batch:  # prepared shards: raw posterior means
            z = self._normalize_raw(batch["latent"].to(device))
        elif self.pixel is not None:
            z = batch["media"].to(device)
        else:
            z = self.wan.to(device).encode(batch["media"].to(device))
        return patchify(z, self.patch), self.conditioner.from_batch(batch, device)

    # --- sampling ---------------------------------------------------------------------------------
    def sample_ids(self, n: int, device: torch.device | str) -> torch.Tensor:
        return grid_ids(*self.grid, batch=n, device=device)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        z = unpatchify(x, self.grid, self.patch)
        if self.pixel is not None:
            return z.clamp(-1, 1)
        return self.wan.to(z.device).decode(z)

    def save_samples(self, media: torch.Tensor, labels: torch.Tensor | None, path: Path) -> Path:
        names = self.class_names
        captions = [names[int(i)] for i in labels] if labels is not None else None
        return save_video_samples(media, path, captions, self.options.fps)

    @property
    def sample_frames(self) -> int:
        """Frames of a decoded sample: the pixel clip's, else the Wan VAE's ``4k + 1`` from ``k + 1`` latents."""
        if self.pixel is not None:
            return self.options.frames
        return (self.latent_shape[1] - 1) * self.wan.compression[0] + 1

    def evaluation_hint(self, out_dir: Path, npz: Path | None, paired: bool) -> str | None:
        frames = self.sample_frames
        short = f" --frames {frames}" if frames < 16 else ""  # FVD's clips are 16 frames: else it fails as printed
        return (f"evaluate with (FVD against real videos{'; prompts paired from prompts.jsonl' if paired else ''}):"
                f"\n  selfflow eval fvd --fake {out_dir} --real REAL_VIDEOS --i3d i3d_torchscript.pt{short}")

    def write_sample(self, media: torch.Tensor, label: int | None, path: Path) -> Path:
        """One clip exactly, as ``<path>.npy`` (uint8 ``(T, H, W, 3)``): what ``selfflow eval fvd`` reads."""
        return save_clip_frames(media, path)

