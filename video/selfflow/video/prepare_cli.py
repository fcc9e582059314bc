"""``selfflow prepare video`` (registered through the ``selfflow.commands`` entry point group).

Run under torchrun to split the shards over ranks (RANK / WORLD_SIZE); run again to finish an
interrupted preparation.
"""

from __future__ import annotations

import argparse

from selfflow.core.arg_types import positive_float, positive_int
from selfflow.core.cli import prepare_subparsers
from selfflow.core.data.prepare_options import (
    add_prepare_arguments,
    prepare_options_from_args,
    print_report,
)


def _run(args: argparse.Namespace) -> int:
    from .prepare import prepare_video

    opts = {**prepare_options_from_args(args), "codec": args.codec, "backend": args.backend,
            "clip": {"frames": args.frames, "height": args.height, "width": args.width, "stride": args.stride,
                     "fps": args.fps}}
    return print_report("video", prepare_video(opts))


def register(subparsers: argparse._SubParsersAction) -> None:
    p = prepare_subparsers(subparsers).add_parser(
        "video", help="videos (+ captions) → Wan VAE latents (+ caption embeddings) in webdataset shards",
        description="One clip per video (4k+1 frames, resized and centre-cropped), the Wan VAE's posterior "
                    "mean, caption and optional caption embedding per sample.")
    add_prepare_arguments(p)
    p.add_argument("--codec", choices=["wan2.2", "wan2.1"], default="wan2.2",
                   help="which Wan VAE --vae-dir holds (wan2.2: 16x spatial, 48 channels; wan2.1: 8x, 16)")
    p.add_argument("--frames", type=positive_int, default=45, help="frames per clip, 4k+1 (paper: 45)")
    p.add_argument("--height", type=positive_int, default=192, help="clip height in pixels, a multiple of 32")
    p.add_argument("--width", type=positive_int, default=320, help="clip width in pixels, a multiple of 32")
    p.add_argument("--stride", type=positive_int, default=1, help="take every n-th source frame")
    p.add_argument("--fps", type=positive_float, help="sample every clip at this frame rate, whatever its "
                   "video's (a 30 fps and a 60 fps video then move alike); instead of --stride")
    p.add_argument("--backend", choices=["auto", "decord", "pyav"], default="auto",
                   help="video decoder (auto: decord where installed, else PyAV)")
    p.set_defaults(func=_run)
