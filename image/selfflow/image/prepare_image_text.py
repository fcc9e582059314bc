"""``selfflow prepare image-text``: captioned images → model-space latents (+ caption embeddings) → shards.

Two input layouts (:func:`selfflow.core.data.manifest.list_media`, shared with video and audio):

- a **folder** of images (recursively) with captions beside them: ``cat.jpg`` + ``cat.txt``;
- a **JSON-lines manifest**: one ``{"path": "cat.jpg", "caption": "a cat"}`` per line (``file`` or
  ``file_name`` also name the image, as in Hugging Face ``imagefolder``'s ``metadata.jsonl``; relative paths
  are relative to the manifest).

Each image is ADM centre-cropped to a ``image_size`` square (as ``prepare imagenet`` does) and encoded with
the chosen codec into the same model space that on-the-fly training uses (:mod:`selfflow.image.codecs`):
SD-VAE posterior mean × 0.18215, FLUX.2 patchified BN-normalised mean, RAE normalised tokens, or the pixels
themselves (``pixel``: no autoencoder). The latent is stored as float16 ``latent.npy`` with the caption
(``txt``; a missing caption is stored as the empty caption) and, when a text encoder is given, its unpadded
embedding (``emb.npy``). Shards are written by :func:`selfflow.core.data.shard_writer.write_shards` — split over
torchrun ranks, resumable, unreadable images skipped, counted and listed in the shards' ``.json`` reports —
and ``codec.json`` records the codec, latent shape, text encoder and a few preview captions.
Train with ``data.options.dataset: image_text_shards``.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import numpy as np
import torch
from pydantic import Field, field_validator

from selfflow.core.data.image_file import read_rgb
from selfflow.core.data.manifest import MediaItem, list_media, preview_captions
from selfflow.core.data.prepare_options import PrepareOptions, rank_device
from selfflow.core.data.shard_writer import write_codec_record, write_shards
from selfflow.text.build_encoder import build_text_encoder

from .codecs import CodecName, check_image_size, codec_name, latent_shape, load_autoencoder, name_of
from .prepare_imagenet import IMAGE_EXTS, center_crop_adm

log = logging.getLogger("selfflow.shards")


class PrepareImageTextOptions(PrepareOptions):
    codec: CodecName = Field("sd_vae", description="sd_vae | flux2 | rae | pixel (CLI: sd-vae …)")
    vae_dir: str | None = Field(None, description="local diffusers autoencoder directory (not for pixel)")
    image_size: int = Field(256, ge=8, description="square ADM centre crop")
    scaling_factor: float = Field(0.18215, gt=0, description="SD-VAE latent scale")
    device: str = "cpu"

    @field_validator("codec", mode="before")
    @classmethod
    def _cli_spelling(cls, v: str) -> str:
        return codec_name(v)


def load_image(path: str, size: int) -> torch.Tensor:
    """``(3, size, size)`` in [-1, 1]: the ADM centre crop of an RGB image; raises on a corrupt or
    over-large file (:func:`~selfflow.core.data.image_file.read_rgb`)."""
    crop = center_crop_adm(read_rgb(path), size)
    return torch.from_numpy(np.asarray(crop, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1


def prepare_image_text(options: PrepareImageTextOptions | dict[str, Any]) -> dict[str, Any]:
    """Run this rank's part; returns the counts of :func:`write_shards`."""
    opts = PrepareImageTextOptions.model_validate(options)
    items = list_media(opts.input, IMAGE_EXTS)  # before the autoencoder: a wrong --input fails at once
    opts.device = rank_device(opts.device)
    vae = None if opts.codec == "pixel" else load_autoencoder(opts.codec, opts.vae_dir, opts.device,
                                                               opts.scaling_factor)
    shape = latent_shape(vae, opts.image_size)
    if vae is not None and opts.image_size % vae.downsample:
        raise ValueError(f"image_size {opts.image_size} is not a multiple of the {opts.codec} downsampling "
                         f"{vae.downsample}")
    if vae is not None:
        check_image_size(vae, opts.image_size)
    encoder = build_text_encoder(opts.text, opts.device) if opts.text is not None else None
    uncaptioned = sum(1 for item in items if item.text is None and item.caption_file is None)
    if uncaptioned and opts.rank == 0:  # a text-to-image dataset without its text is most likely a mistake
        log.warning("%d of %d images have no caption (no NAME.txt beside them, no \"caption\" in the manifest): "
                    "they are stored with the empty caption", uncaptioned, len(items))

    def process(item: MediaItem) -> dict[str, Any]:
        x = load_image(str(item.path), opts.image_size)
        latent = x if vae is None else vae.encode(x[None].to(opts.device))[0]
        caption = item.caption or ""
        emb = encoder.encode_unpadded([caption])[0] if encoder is not None else None
        return {"latent": latent, "caption": caption, "label": item.label, "emb": emb,
                "info": {"source": str(item.path)}}

    if opts.rank == 0:
        write_codec_record(opts.out, {
            "codec": name_of(vae), "image_size": opts.image_size, "latent_shape": list(shape),
            "space": "model", "scaling_factor": opts.scaling_factor if opts.codec == "sd_vae" else None,
            "text": None if encoder is None else encoder.describe(),
            "sample_captions": preview_captions(items)})
    with torch.inference_mode():
        return write_shards(items, process, opts.out, prefix="image", shard_size=opts.shard_size,
                            rank=opts.rank, world_size=opts.world_size, progress=opts.progress)


def _run(args: argparse.Namespace) -> int:
    from selfflow.core.data.prepare_options import prepare_options_from_args, print_report

    opts = {**prepare_options_from_args(args), "codec": args.codec, "image_size": args.image_size}
    return print_report("image-text", prepare_image_text(opts))


def register(subparsers: argparse._SubParsersAction) -> None:
    """``selfflow prepare image-text`` (added by :func:`selfflow.image.prepare_cli.register`)."""
    from selfflow.core.cli import prepare_subparsers
    from selfflow.core.data.prepare_options import add_prepare_arguments

    p = prepare_subparsers(subparsers).add_parser(
        "image-text", help="captioned images → latents (+ caption embeddings) in webdataset shards",
        description="A folder of images with NAME.txt captions beside them, or a .jsonl manifest of "
                    '{"path": …, "caption": …}: ADM centre crop, the codec\'s model-space latent, caption and '
                    "optional caption embedding per sample. Run under torchrun to split the shards over "
                    "ranks; run again to finish an interrupted preparation.")
    add_prepare_arguments(p, vae_required=False)
    p.add_argument("--codec", choices=["sd-vae", "flux2", "rae", "pixel"], default="sd-vae",
                   help="pixel stores the crop itself (no --vae-dir)")
    p.add_argument("--image-size", type=int, default=256, help="square crop size (rae: its decoder's size)")
    p.set_defaults(func=_run)
