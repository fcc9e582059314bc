"""Lists of captioned media files for ``selfflow prepare``, and the shared prepare options.

Input is either a directory (every file with one of the given extensions, recursively, sorted; the
caption of ``clip.mp4`` is ``clip.txt`` beside it, if present) or a JSON-lines manifest with one object
per line: ``{"path": "...", "caption": "...", "label": 3}`` (relative paths are relative to the manifest;
``file`` or ``file_name`` — the Hugging Face ``imagefolder`` ``metadata.jsonl`` column — may stand for
``path``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from .encoder import TextEncoderOptions


@dataclass(frozen=True)
class MediaItem:
    path: Path
    caption: str | None = None
    label: int | None = None

    def __str__(self) -> str:
        return str(self.path)


_PATH_KEYS = ("path", "file", "file_name")


def list_media(source: str | Path, extensions: tuple[str, ...]) -> list[MediaItem]:
    src = Path(source)
    if src.is_dir():
        files = sorted(p for p in src.rglob("*") if p.suffix.lower() in extensions)
        return [MediaItem(p, p.with_suffix(".txt").read_text().strip() if p.with_suffix(".txt").is_file()
                          else None) for p in files]
    if src.is_file() and src.suffix == ".jsonl":
        items = []
        for n, line in enumerate(src.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                path = Path(next(row[k] for k in _PATH_KEYS if k in row))
            except (json.JSONDecodeError, StopIteration, TypeError) as e:
                raise ValueError(f"{src}:{n}: expected {{\"path\": …, \"caption\": …}} ({e})") from None
            items.append(MediaItem(path if path.is_absolute() else src.parent / path, row.get("caption"),
                                   row.get("label")))
        return items
    raise FileNotFoundError(f"prepare input {src} is neither a directory nor a .jsonl manifest")


class PrepareOptions(BaseModel):
    """Options every prepare target shares; rank and world size default to torchrun's environment."""

    model_config = ConfigDict(extra="forbid")

    input: str = Field(description="directory of media (+ .txt captions) or a .jsonl manifest")
    out: str = Field(description="output directory for the shards")
    shard_size: int = Field(256, ge=1, description="samples per shard")
    text: TextEncoderOptions | None = Field(None, description="also store caption embeddings (None: captions only)")
    rank: int = Field(default_factory=lambda: int(os.environ.get("RANK", "0")), ge=0)
    world_size: int = Field(default_factory=lambda: int(os.environ.get("WORLD_SIZE", "1")), ge=1)
    seed: int = Field(0, description="clip / crop positions are drawn from (seed, item index)")


def add_prepare_arguments(p, vae_required: bool = True) -> None:
    """The ``selfflow prepare <target>`` arguments every media target shares (see :class:`PrepareOptions`);
    ``vae_required=False`` for targets that can also store pixels (no autoencoder)."""
    p.add_argument("--input", required=True, help="directory of media (+ NAME.txt captions) or a .jsonl manifest")
    p.add_argument("--out", required=True, help="output directory for the shards")
    p.add_argument("--vae-dir", required=vae_required, help="local diffusers-format VAE directory")
    p.add_argument("--shard-size", type=int, default=256, help="samples per shard")
    p.add_argument("--text-model-dir", help="also store caption embeddings of this local transformers model")
    p.add_argument("--text-layers", default="-1", help="hidden-state layers to stack, e.g. -1 or 9,18,27")
    p.add_argument("--tiny-text", type=int, metavar="DIM", help="… or of the built-in tiny encoder of width DIM")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")


def prepare_options_from_args(args) -> dict:
    """Parsed shared arguments → the option dict of a prepare function (rank/world from the environment)."""
    text = None
    if args.text_model_dir:
        text = {"kind": "hf", "model_dir": args.text_model_dir,
                "layers": [int(v) for v in args.text_layers.split(",")]}
    elif args.tiny_text:
        text = {"kind": "tiny", "dim": args.tiny_text}
    return {"input": args.input, "out": args.out, "vae_dir": args.vae_dir, "shard_size": args.shard_size,
            "text": text, "seed": args.seed, "device": args.device}


def print_report(target: str, report: dict) -> int:
    print(f"prepare {target}: {report['written']} samples in {report['shards']} new shard(s), "
          f"{report['existing']} shard(s) already done, {report['skipped']} unreadable file(s) skipped "
          "(listed in the shards' .json reports)")
    return 0
