"""The audio modality: synthetic chords (embedded default, raw waveform) or prepared Oobleck latents; WAV.

Tokens: ids ``(t, 0, 0)``, ``t`` = latent frame (or waveform patch). Defaults for Self-Flow: mask ratio
R_M = 0.5 (paper) and uniform timesteps shifted towards noise (shift 2.0; override with
``objective.timesteps``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from selfflow.core.codec import stands_in
from selfflow.core.data.indexed_stream import IndexedStream
from selfflow.core.data.shard_format import check_shard_record, read_codec_info, required_shard_urls
from selfflow.core.data.shard_stream import ShardReadOptions, ShardStream
from selfflow.core.data.stats import latent_stats
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
from selfflow.core.tokens import Conditioning, Tokens
from selfflow.text.conditioning import CaptionConditioner, CaptionedModalityMixin
from selfflow.text.encoder import TextEncoderOptions

from .audio_io import write_wav
from .synthetic_tones import CAPTIONS, render_batch
from .waveform_codec import WaveformCodec, frames_to_tokens, tokens_to_frames

log = logging.getLogger(__name__)


def latent_patch(patch: int, frames: int, shards: str) -> int:
    """Latent frames per token: ``patch`` when it divides ``frames``, else 1 — said in a warning, since the
    option's default (64, the waveform's) rarely divides a latent clip (the paper's 10 s: 250 frames). Not an
    error: runs trained with such a value resume with it, and their config must not change."""
    if frames % patch == 0:
        return patch
    divisors = [d for d in range(1, frames + 1) if frames % d == 0]
    log.warning("data.options.patch=%d does not divide the %d latent frames of %s: 1 frame per token (%d tokens). "
                "Set it to a divisor to silence this: %s%s", patch, frames, shards, frames, divisors[:12],
                " …" if len(divisors) > 12 else "")
    return 1


class _CommonAudioOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    codec: Literal["waveform", "songbloom", "stable_audio"] = Field("waveform", description="latent_shards: an Oobleck VAE")
    sample_rate: int = Field(8000, ge=1000, description="Hz of synthetic tones (shards: codec.json's, if recorded)")
    num_samples: int = Field(4096, ge=64, description="waveform codec: samples per clip")
    patch: int = Field(64, ge=1, description="samples per token: waveform samples, or latent frames (must divide "
                       "the prepared clip's frames; one that does not is read as 1, with a warning)")
    conditioning: Literal["class", "text"] = "text"
    text: TextEncoderOptions = Field(default_factory=TextEncoderOptions)
    sample_captions: list[str] | None = Field(None, description="preview prompts (None: the prepared shards' own captions, else the synthetic ones)")
    vae_dir: str | None = model_location("Oobleck codec: local diffusers-format directory (decoding)")


class SyntheticTonesOptions(_CommonAudioOptions):
    dataset: Literal["synthetic_tones"] = "synthetic_tones"
    data_seed: int = Field(0, description="which synthetic stream (independent of the training seed)")


class AudioShardsOptions(_CommonAudioOptions, ShardReadOptions):
    dataset: Literal["latent_shards"]
    shards: str = data_location("directory written by `selfflow prepare audio`")


AudioOptions = options_union("dataset", "synthetic_tones", SyntheticTonesOptions, AudioShardsOptions)


@register_modality
class AudioModality(CaptionedModalityMixin, Modality):
    name = "audio"
    Options = AudioOptions
    default_mask_ratio = 0.5
    default_timesteps = TimestepDistribution(kind="uniform", shift=2.0)
    default_sampler = SamplerSettings(shift=default_timesteps.shift)  # sample at the training shift

    def __init__(self, options: dict[str, Any] | BaseModel | None = None):
        super().__init__(options)
        o = self.options
        self.waveform = None
        self.info: dict[str, Any] = {}
        if o.dataset == "latent_shards":
            if o.codec == "waveform":
                raise ValueError("dataset 'latent_shards' needs an Oobleck codec (codec: songbloom | stable_audio)")
            self.info = self._read_shard_info()
            check_shard_record(self.info, o.shards, "audio", latent_dims=2, codec_key="kind", codec=o.codec)
            if self.info.get("latent_mean") is None:  # dataset statistics from the shard reports
                self.info["latent_mean"], self.info["latent_std"] = latent_stats(o.shards)
            self.channels, self.length = self.info["latent_shape"]
            self.patch = latent_patch(o.patch, self.length, o.shards)
        else:
            self.waveform = WaveformCodec(o.num_samples, o.patch)
            self.channels, self.length, self.patch = 2, o.num_samples, o.patch
        self._oobleck = None
        # previews: the options' captions, else the shards' own (codec.json), else the synthetic ones
        self.conditioner = CaptionConditioner(o.conditioning, CAPTIONS, o.text,
                                              o.sample_captions or self.info.get("sample_captions"))
        self.check_stored_captions(self.info, getattr(o, "shards", ""))

    def _read_shard_info(self) -> dict[str, Any]:
        """``codec.json`` of the shards; under ``shapes_only()`` without it, the latent shape of the clip that
        ``selfflow prepare audio`` makes by default (the paper's 10 s), with unit statistics."""
        o = self.options
        if not stands_in(o.shards, "codec.json"):
            return read_codec_info(o.shards, "audio")
        from .oobleck_codec import PUBLISHED_SHAPES, clip_samples
        from .prepare import PrepareAudioOptions

        vae = PUBLISHED_SHAPES[o.codec]
        seconds = PrepareAudioOptions.model_fields["seconds"].default
        c = vae.latent_channels
        return {"latent_shape": [c, clip_samples(seconds, vae.sample_rate, vae.hop) // vae.hop],
                "sample_rate": vae.sample_rate, "latent_mean": [0.0] * c, "latent_std": [1.0] * c}

    @property
    def oobleck(self):
        if self._oobleck is None:
            from .oobleck_codec import OobleckCodec

            if not self.options.vae_dir:
                raise ValueError(f"codec {self.options.codec!r} needs data.options.vae_dir to decode samples")
            self._oobleck = OobleckCodec.from_pretrained(self.options.vae_dir, self.options.codec)
            self._oobleck.set_stats(self.info["latent_mean"], self.info["latent_std"])
        return self._oobleck

    @property
    def sample_rate(self) -> int:
        return int(self.info.get("sample_rate", self.options.sample_rate))

    @property
    def token_channels(self) -> int:
        return self.channels * self.patch

    def stream(self, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> DataStream:
        o = self.options
        if o.dataset == "latent_shards":
            return ShardStream(required_shard_urls(o.shards, "audio"), batch_size, seed=seed, rank=rank,
                               world_size=world_size, num_workers=o.num_workers, shuffle_buffer=o.shuffle_buffer)

        def render(indices: range) -> Batch:
            media, labels, captions = render_batch(o.data_seed, indices, o.sample_rate, o.num_samples)
            return {"media": media, "labels": labels, "captions": captions}

        return IndexedStream(render, batch_size, rank, world_size)

    def encode(self, batch: Batch, device: torch.device | str) -> tuple[Tokens, Conditioning]:
        if "latent" in batch:  # raw Oobleck means (B, C, T) → dataset-normalised
            mean = torch.tensor(self.info["latent_mean"], device=device).view(1, -1, 1)
            std = torch.tensor(self.info["latent_std"], device=device).view(1, -1, 1)
            z = (batch["latent"].to(device) - mean) / std
        else:
            z = batch["media"].to(device)
        return frames_to_tokens(z, self.patch), self.conditioner.from_batch(batch, device)

    def sample_ids(self, n: int, device: torch.device | str) -> torch.Tensor:
        t = torch.arange(self.length // self.patch, device=device)
        return torch.stack([t, torch.zeros_like(t), torch.zeros_like(t)], -1).expand(n, -1, -1)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        z = tokens_to_frames(x, self.length, self.patch)
        return z.clamp(-1, 1) if self.waveform is not None else self.oobleck.to(z.device).decode(z)

    def save_samples(self, media: torch.Tensor, labels: torch.Tensor | None, path: Path) -> Path:
        """One WAV: the samples in order with 0.25 s of silence between them; captions in a .txt."""
        path = Path(path)
        gap = torch.zeros(media.shape[1], self.sample_rate // 4)
        wav = write_wav(torch.cat([torch.cat([m.cpu(), gap], 1) for m in media], 1), path.with_suffix(".wav"),
                        self.sample_rate)
        if labels is not None:
            self.write_captions(labels, path)
        return wav

    def evaluation_hint(self, out_dir: Path, npz: Path | None, paired: bool) -> str | None:
        return (f"evaluate with (FAD against real audio{'; prompts paired from prompts.jsonl' if paired else ''}):"
                f"\n  selfflow eval fad --fake {out_dir} --real REAL_AUDIO --clap-a CLAP_DIR")

    def write_sample(self, media: torch.Tensor, label: int | None, path: Path) -> Path:
        """One sample exactly, as ``<path>.wav`` (no trailing gap: FAD windows every second of the file)."""
        return write_wav(media, Path(path).with_suffix(".wav"), self.sample_rate)
