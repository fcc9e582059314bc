"""``selfflow prepare audio`` (registered through the ``selfflow.commands`` entry point group).

Run under torchrun to split the shards over ranks (RANK / WORLD_SIZE); run again to finish an
interrupted preparation.
"""

from __future__ import annotations

import argparse

from selfflow.core.arg_types import positive_float
from selfflow.core.cli import prepare_subparsers
from selfflow.core.data.prepare_options import (
    add_prepare_arguments,
    prepare_options_from_args,
    print_report,
)


def _run(args: argparse.Namespace) -> int:
    from .prepare import prepare_audio

    opts = {**prepare_options_from_args(args), "codec": args.codec, "seconds": args.seconds}
    return print_report("audio", prepare_audio(opts))


def register(subparsers: argparse._SubParsersAction) -> None:
    p = prepare_subparsers(subparsers).add_parser(
        "audio", help="audio (+ captions) → Oobleck VAE latents (+ caption embeddings) in webdataset shards",
        description="One stereo window per file at the VAE's sample rate, the VAE's posterior mean, caption "
                    "and optional caption embedding per sample; dataset latent statistics from the shard reports.")
    add_prepare_arguments(p)
    p.add_argument("--codec", choices=["songbloom", "stable_audio"], default="songbloom",
                   help="which Oobleck VAE --vae-dir holds")
    p.add_argument("--seconds", type=positive_float, default=10.0, help="clip length in seconds (paper: 10)")
    p.set_defaults(func=_run)
