"""``selfflow prepare rt1`` and ``selfflow prepare rt1-fake`` (``selfflow.commands`` entry point group)."""

from __future__ import annotations

import argparse

from selfflow.core.arg_types import fraction, non_negative_int, positive_int
from selfflow.core.cli import prepare_subparsers


def _run(args: argparse.Namespace) -> int:
    from .prepare import prepare_rt1

    m = prepare_rt1({"input": args.input, "out": args.out, "val_fraction": args.val_fraction,
                     "min_steps": args.min_steps, "max_shards": args.max_shards, "progress": not args.no_progress})
    if "pending" in m:
        print(f"prepare rt1: this rank is done; shards {m['pending']} are still converting on other ranks "
              "(run again once they finish, or let the last rank merge stats.json and manifest.json)")
        return 0
    print(f"prepare rt1: {m['episodes']['train']} train / {m['episodes']['val']} val episodes "
          f"({m['steps']['train']} / {m['steps']['val']} steps), {len(m['rejected'])} rejected"
          f"{_cut_short(m['rejected'])}, "
          f"{m['too_short']} too short; stats.json and manifest.json in {args.out}")
    return 0


def _cut_short(rejected: list[dict]) -> str:
    n = sum(1 for e in rejected if e.get("rest_of_file"))
    return f" ({n} file(s) cut short: their later episodes unread, uncounted)" if n else ""


def _run_fake(args: argparse.Namespace) -> int:
    from .fractal import write_fake_shards

    paths = write_fake_shards(args.out, shards=args.shards, episodes_per_shard=args.episodes, seed=args.seed)
    print(f"wrote {len(paths)} fake RT-1 TFRecord shard(s) (synthetic, NOT real data) to {args.out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    targets = prepare_subparsers(subparsers)
    p = targets.add_parser("rt1", help="RT-1 fractal TFRecords → episode webdataset shards + stats.json",
                           description="TensorFlow-free conversion of fractal20220817_data: one sample per "
                                       "episode (original JPEGs, raw 7-D actions, instruction, meta), a "
                                       "hash-based validation split and action statistics. Resumable; "
                                       "under torchrun the ranks share the source shards.")
    p.add_argument("--input", required=True, help="directory of *.tfrecord* shards (or one file)")
    p.add_argument("--out", required=True, help="output directory for the episode shards, stats.json and "
                                                "manifest.json")
    p.add_argument("--val-fraction", type=fraction, default=0.03,
                   help="episodes held out for validation, chosen by a hash of the episode id")
    p.add_argument("--min-steps", type=positive_int, default=1, help="drop episodes shorter than this many steps")
    p.add_argument("--max-shards", type=positive_int, help="convert only the first N source shards (smoke runs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)
    f = targets.add_parser("rt1-fake", help="write synthetic TFRecords with RT-1's real key names (tests)",
                           description="Synthetic episodes (random images, actions and instructions) in RT-1's "
                                       "TFRecord layout and key names, to try `selfflow prepare rt1` and an rt1 "
                                       "training without the 111 GiB dataset. Not real data.",
                           epilog="examples:\n"
                                  "  selfflow prepare rt1-fake --out data/rt1-fake-tfrecords\n"
                                  "  selfflow prepare rt1 --input data/rt1-fake-tfrecords --out data/rt1-fake")
    f.add_argument("--out", required=True, help="output directory for the TFRecord shards")
    f.add_argument("--shards", type=positive_int, default=2, help="TFRecord shards to write")
    f.add_argument("--episodes", type=positive_int, default=8, help="episodes per shard")
    f.add_argument("--seed", type=non_negative_int, default=0, help="seed of the synthetic episodes")
    f.set_defaults(func=_run_fake)
