"""``selfflow prepare video``: videos (+ captions) → Wan latents (+ caption embeddings) → shards.

Each item: one clip (:class:`ClipSpec`, a random window drawn from ``(seed, item index)``) → the raw
posterior mean of the Wan VAE (``(C, T, H, W)`` float16) → a shard sample with its caption and, when a
text encoder is configured, the unpadded caption embedding. Ranks split the shards
(:func:`selfflow.core.data.shard_writer.write_shards`: parallel, resumable, corrupt files skipped and counted). The
output directory's ``codec.json`` records the codec, its normalisation and the latent shape.
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

from .clips import ClipSpec, sample_clip
from .video_io import Backend

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".gif")


class PrepareVideoOptions(PrepareOptions):
    codec: Literal["wan2.2", "wan2.1"] = "wan2.2"
    vae_dir: str = Field(description="local diffusers-format Wan vae/ directory")
    clip: ClipSpec = Field(default_factory=ClipSpec)
    backend: Backend = "auto"
    device: str = "cpu"


def prepare_video(options: PrepareVideoOptions | dict[str, Any]) -> dict[str, Any]:
    """Run this rank's part; returns the counts of :func:`write_shards`."""
    from .wan_codec import WanCodec

    opts = PrepareVideoOptions.model_validate(options)
    items = list_media(opts.input, VIDEO_EXTENSIONS)  # before the codec: a wrong --input fails at once
    opts.device = rank_device(opts.device)  # this rank's GPU under torchrun
    codec = WanCodec.from_pretrained(opts.vae_dir, opts.codec).to(opts.device)
    encoder = build_text_encoder(opts.text, opts.device) if opts.text is not None else None
    index = {it.path: i for i, it in enumerate(items)}
    spec = opts.clip

    short: list[int] = []  # repeated frames of each video shorter than the clip (this run's)

    def process(item: MediaItem) -> dict[str, Any]:
        rng = np.random.default_rng([opts.seed, index[item.path]])
        clip = sample_clip(item.path, spec, rng, opts.backend)
        latent = codec.encode_raw(clip.pixels[None].to(opts.device))[0]
        emb = encoder.encode_unpadded([item.caption or ""])[0] if encoder is not None else None
        info: dict[str, Any] = {"source": str(item.path)}
        if clip.repeated:
            info["repeated_frames"] = clip.repeated
            short.append(clip.repeated)
        return {"latent": latent, "caption": item.caption, "label": item.label, "emb": emb, "info": info}

    if opts.rank == 0:
        write_codec_record(opts.out, {
            **codec.describe(), "version": opts.codec, "clip": spec.model_dump(exclude_none=True),
            "latent_shape": list(codec.latent_shape(spec.frames, spec.height, spec.width)),
            "text": None if encoder is None else encoder.describe(), "sample_captions": preview_captions(items)})
    with torch.inference_mode():
        report = write_shards(items, process, opts.out, prefix="video", shard_size=opts.shard_size,
                              rank=opts.rank, world_size=opts.world_size, progress=opts.progress)
    report["notes"] = [] if not short else [
        f"{len(short)} video(s) shorter than the clip ({spec.frames} frames{'' if spec.fps is None else f' at {spec.fps:g} fps'}"
        f"{f', stride {spec.stride}' if spec.stride > 1 else ''}): their last frame repeats (up to {max(short)} times; "
        "repeated_frames in their samples' info)"]
    return report
