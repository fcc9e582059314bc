"""The options and command-line arguments every media ``selfflow prepare`` target shares, and its report."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..arg_types import device_name, non_negative_int, positive_int, resolve_device


class PrepareOptions(BaseModel):
    """Options every prepare target shares; rank and world size default to torchrun's environment."""

    model_config = ConfigDict(extra="forbid")

    input: str = Field(description="directory of media (+ .txt captions) or a .jsonl manifest")
    out: str = Field(description="output directory for the shards")
    shard_size: int = Field(256, ge=1, description="samples per shard")
    # validated by the text package's build_text_encoder (core does not import modality packages)
    text: dict[str, Any] | None = Field(None, description="also store caption embeddings of this text "
                                        "encoder (TextEncoderOptions; None: captions only)")
    rank: int = Field(default_factory=lambda: int(os.environ.get("RANK", "0")), ge=0)
    world_size: int = Field(default_factory=lambda: int(os.environ.get("WORLD_SIZE", "1")), ge=1)
    seed: int = Field(0, description="clip / crop positions are drawn from (seed, item index)")
    progress: bool = Field(False, description="a progress bar over this rank's shards")


def rank_device(device: str) -> str:
    """``cuda`` under torchrun means this rank's GPU (``cuda:LOCAL_RANK``), not every rank on GPU 0; ``auto``
    means CUDA when there is a GPU."""
    if device == "auto":
        device = resolve_device(device).type
    local = os.environ.get("LOCAL_RANK")
    return f"cuda:{local}" if device == "cuda" and local is not None else device


def add_prepare_arguments(p: argparse.ArgumentParser, vae_required: bool = True) -> None:
    """The ``selfflow prepare <target>`` arguments every media target shares (see :class:`PrepareOptions`);
    ``vae_required=False`` for targets that can also store pixels (no autoencoder)."""
    p.add_argument("--input", required=True, help="directory of media (+ NAME.txt captions) or a .jsonl manifest")
    p.add_argument("--out", required=True, help="output directory for the shards")
    p.add_argument("--vae-dir", required=vae_required, help="local diffusers-format VAE directory")
    p.add_argument("--shard-size", type=positive_int, default=256, help="samples per shard (default 256)")
    p.add_argument("--text-model-dir", help="also store caption embeddings of this local transformers model")
    p.add_argument("--text-layers", default="-1", help="hidden-state layers to stack, e.g. -1 or 9,18,27")
    p.add_argument("--tiny-text", type=positive_int, metavar="DIM",
                   help="… or of the built-in tiny encoder of width DIM")
    p.add_argument("--seed", type=non_negative_int, default=0, help="clip / crop positions are drawn from (seed, item index)")
    p.add_argument("--device", type=device_name, default="auto", help="where the autoencoder and text encoder "
                   "run: auto (cuda if available), cpu, cuda (under torchrun: each rank's GPU), cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def prepare_options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Parsed shared arguments → the option dict of a prepare function (rank/world from the environment)."""
    text = None
    if args.text_model_dir:
        text = {"kind": "hf", "model_dir": args.text_model_dir,
                "layers": [int(v) for v in args.text_layers.split(",")]}
    elif args.tiny_text:
        text = {"kind": "tiny", "dim": args.tiny_text}
    return {"input": args.input, "out": args.out, "vae_dir": args.vae_dir, "shard_size": args.shard_size,
            "text": text, "seed": args.seed, "device": args.device, "progress": not args.no_progress}


def print_report(target: str, report: dict[str, Any]) -> int:
    """One line per process. The ranks of a torchrun preparation share no process group (each writes its own
    shards), so each reports its part, and says so."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    part = f" (rank {os.environ.get('RANK', '0')} of {world}: its shards only)" if world > 1 else ""
    print(f"prepare {target}{part}: {report['written']} samples in {report['shards']} new shard(s), "
          f"{report['existing']} shard(s) already done, {report['skipped']} unreadable file(s) skipped "
          "(listed in the shards' .json reports)")
    for note in report.get("notes", []):
        print(f"note: {note}", file=sys.stderr)
    return 0
