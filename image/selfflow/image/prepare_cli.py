"""``selfflow prepare imagenet`` and ``selfflow prepare image-text`` (registered through the
``selfflow.commands`` entry point group)."""

from __future__ import annotations

import argparse
from pathlib import Path

from selfflow.core.arg_types import device_name, positive_int
from selfflow.core.cli import prepare_subparsers
from selfflow.core.config import ConfigError


def _run(args: argparse.Namespace) -> int:
    from selfflow.core.distributed import barrier, init_distributed, torn_down_after
    from selfflow.core.run_setup import pick_device

    from .codecs import load_autoencoder
    from .prepare_imagenet import PrepareOptions, prepare_imagenet, summarize

    if not args.src.is_dir():  # before the autoencoder loads: a typo in --src fails at once
        raise ConfigError(f"--src {args.src} is not a directory (the ImageNet train folder: one folder per class)")
    with torn_down_after():
        dist = init_distributed(pick_device(args.device))
        vae = load_autoencoder(args.codec, args.vae, dist.device)
        opts = PrepareOptions(src=args.src, out=args.out, image_size=args.image_size, shard_size=args.shard_size,
                              batch_size=args.batch_size, flip=args.flip, store_pixels=args.store_pixels,
                              latent_dtype=args.latent_dtype)
        mine = prepare_imagenet(vae, opts, dist.rank, dist.world_size, progress=not args.no_progress)
        barrier()
    print(f"rank {dist.rank}: {mine['shards']} shard(s) written, {mine['existing']} already done, "
          f"{mine['written']} images, {mine['skipped']} skipped")
    if dist.is_main:
        total = summarize(args.out)
        print(f"{args.out}: {total['written']} images in shards, {total['skipped']} unreadable images skipped "
              "(listed in the shards' .json reports)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the image targets ``imagenet`` and ``image-text`` to ``selfflow prepare``."""
    _register_imagenet(subparsers)
    from .prepare_image_text import register as register_image_text

    register_image_text(subparsers)


def _register_imagenet(subparsers: argparse._SubParsersAction) -> None:
    p = prepare_subparsers(subparsers).add_parser(
        "imagenet", help="ImageNet train folder → SD-VAE / FLUX.2 / RAE latents in webdataset shards",
        description="ADM centre crop → SD-VAE posterior mean and std, or the FLUX.2 / RAE model-space latent "
                    "(optionally of the mirrored image too), label → webdataset shards. Run under torchrun to "
                    "split the shards over ranks; run again to finish an interrupted preparation.")
    p.add_argument("--src", type=Path, required=True, help="ImageNet train directory (one folder per class)")
    p.add_argument("--out", type=Path, required=True, help="output directory for shard-XXXXXX.tar")
    p.add_argument("--codec", choices=["sd-vae", "flux2", "rae"], default="sd-vae",
                   help="sd-vae: AutoencoderKL moments; flux2: AutoencoderKLFlux2 (patchified, BN-normalised); "
                        "rae: AutoencoderRAE (normalised)")
    p.add_argument("--vae", "--vae-dir", type=Path, required=True, dest="vae",
                   help="local diffusers directory of the codec's autoencoder")
    p.add_argument("--latent-dtype", choices=["float32", "float16"], default="float32",
                   help="flux2 / rae latents (SD-VAE moments are always float32)")
    p.add_argument("--image-size", type=positive_int, default=256, help="square ADM centre crop (default 256)")
    p.add_argument("--shard-size", type=positive_int, default=1000, help="images per shard (default 1000)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per VAE forward (default 32)")
    p.add_argument("--flip", action="store_true", help="also store the moments of the mirrored image")
    p.add_argument("--store-pixels", action="store_true", help="also store the 256-px crop (needed by REPA)")
    p.add_argument("--device", type=device_name, default="auto",
                   help="auto (cuda if available), cpu, cuda (under torchrun: each rank's GPU), cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)
