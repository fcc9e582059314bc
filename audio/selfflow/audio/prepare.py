"""``selfflow prepare audio``: audio files (+ captions) → Oobleck latents (+ caption embeddings) → shards.

Each item: a ``seconds`` window (random start drawn from ``(seed, item index)``; zero-padded when the
file is shorter) read at the VAE's sample rate in stereo → the raw posterior mean ``(C, T)`` float16.
Latent statistics for the normalisation are the per-channel dataset statistics merged from the shard
reports at training time (:func:`selfflow.core.data.stats.latent_stats`).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from selfflow.core.data.manifest import MediaItem, list_media, preview_captions
from selfflow.core.data.prepare_options import PrepareOptions, rank_device
from selfflow.core.data.shard_writer import write_codec_record, write_shards
from selfflow.text.build_encoder import build_text_encoder

from .audio_io import audio_duration, fit_length, read_audio

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".m4a", ".aac", ".opus")


class PrepareAudioOptions(PrepareOptions):
    codec: Literal["songbloom", "stable_audio"] = "songbloom"
    vae_dir: str = Field(description="local diffusers-format AutoencoderOobleck directory")
    seconds: float = Field(10.0, gt=0, description="clip length (the paper: 10 s)")
    device: str = "cpu"


def prepare_audio(options: PrepareAudioOptions | dict[str, Any]) -> dict[str, Any]:
    """Run this rank's part; returns the counts of :func:`write_shards`."""
    from .oobleck_codec import OobleckCodec, clip_samples

    opts = PrepareAudioOptions.model_validate(options)
    items = list_media(opts.input, AUDIO_EXTENSIONS)  # before the codec: a wrong --input fails at once
    opts.device = rank_device(opts.device)  # this rank's GPU under torchrun
    codec = OobleckCodec.from_pretrained(opts.vae_dir, opts.codec).to(opts.device)
    sr = codec.sample_rate
    n = clip_samples(opts.seconds, sr, codec.hop)
    encoder = build_text_encoder(opts.text, opts.device) if opts.text is not None else None
    index = {it.path: i for i, it in enumerate(items)}

    short: list[float] = []  # seconds of zero padding of each file shorter than the window (this run's)

    def process(item: MediaItem) -> dict[str, Any]:
        rng = np.random.default_rng([opts.seed, index[item.path]])
        start = rng.uniform(0, max(0.0, audio_duration(item.path) - n / sr))
        read = read_audio(item.path, sr, codec.audio_channels, start, n / sr)
        wave = fit_length(read, n)
        latent = codec.encode_raw(wave[None].to(opts.device))[0]
        emb = encoder.encode_unpadded([item.caption or ""])[0] if encoder is not None else None
        info: dict[str, Any] = {"source": str(item.path), "start_s": start}
        if read.shape[1] < n:
            info["padded_s"] = round((n - read.shape[1]) / sr, 3)
            short.append(info["padded_s"])
        return {"latent": latent, "caption": item.caption, "label": item.label, "emb": emb, "info": info}

    if opts.rank == 0:
        write_codec_record(opts.out, {
            **codec.describe(), "kind": opts.codec, "latent_shape": [codec.latent_channels, n // codec.hop],
            "latent_mean": None, "latent_std": None,
            "text": None if encoder is None else encoder.describe(), "sample_captions": preview_captions(items)})
    with torch.inference_mode():
        report = write_shards(items, process, opts.out, prefix="audio", shard_size=opts.shard_size,
                              rank=opts.rank, world_size=opts.world_size, progress=opts.progress)
    report["notes"] = [] if not short else [
        f"{len(short)} file(s) shorter than the {opts.seconds:g} s window: zero-padded to it (up to "
        f"{max(short):g} s; padded_s in their samples' info)"]
    return report
