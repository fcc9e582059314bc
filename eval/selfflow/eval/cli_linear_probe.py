"""``selfflow eval linear-probe``: per-block linear-probe accuracy of a run's frozen EMA model (JSON + PNG).

Kept apart from :mod:`.linear_probe` so that building the CLI does not import torch."""

from __future__ import annotations

import argparse
import json
from typing import Any

from selfflow.core.arg_types import (
    add_model_argument,
    device_name,
    non_negative_int,
    output_file,
    positive_int,
)
from selfflow.core.atomic import atomic_write_text


def add_linear_probe_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "linear-probe", help="linear-probe accuracy of a run's blocks on noised held-out images",
        description="Freeze the run's EMA model, take each block's token-mean hidden states of held-out labelled "
                    "images noised to each level t (null condition), fit a closed-form ridge classifier "
                    "(λ chosen on a split of the fitting set) and report test accuracy per block and level. "
                    "Built-in labelled datasets only (synthetic_shapes, digits).")
    add_model_argument(p, required=True)
    p.add_argument("--levels", type=float, nargs="+", default=[0.0, 0.25, 0.5],
                   help="noise levels t (0 = clean data, 1 = noise)")
    p.add_argument("--blocks", type=int, nargs="+", help="blocks to probe, 1…depth (default: all)")
    p.add_argument("--num-fit", type=positive_int, default=1000,
                   help="labelled images to fit the classifier on (default 1000)")
    p.add_argument("--num-test", type=positive_int, default=500, help="held-out images to score it on (default 500)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="noise and validation-split seed")
    p.add_argument("--weights", choices=["ema", "model"], default="ema",
                   help="the run's EMA weights, or its newest checkpoint's model weights")
    p.add_argument("--device", type=device_name, default="auto", help="auto (cuda if available), cpu, cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", type=output_file, help="JSON output (default: RUN/linear_probe.json; the plot beside it)")
    p.set_defaults(func=cmd_linear_probe)
    return p


def cmd_linear_probe(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from selfflow.core.pretrained import load_model, model_root

    from .cli import _fail, one_process
    from .linear_probe import linear_probe, plot_probe

    one_process("linear-probe")
    if any(not 0 <= t < 1 for t in args.levels):
        return _fail(ValueError(f"--levels must lie in [0, 1), got {args.levels}"))
    try:
        loaded = load_model(args.run, args.device, weights=args.weights, locations=args.locations)
        model, modality = loaded.model, loaded.modality
        with tqdm(total=len(args.levels), desc="linear probe", unit="level", leave=False,
                  disable=args.no_progress or None) as bar:
            result = linear_probe(model, modality, args.levels, args.blocks, args.num_fit, args.num_test,
                                  args.seed, progress=bar.update)
    except (FileNotFoundError, KeyError, ValueError) as e:
        return _fail(e)
    result = {**result, "run": str(args.run), "weights": args.weights}
    out = args.out or model_root(args.run) / "linear_probe.json"
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    plot = plot_probe(result, out.with_suffix(".png"), f"{model_root(args.run).name}: linear probe ({args.weights})")
    header = "block " + " ".join(f"t={t:<5}" for t in args.levels)
    print(header)
    for k in result["blocks"]:
        print(f"{k:>5} " + " ".join(f"{result['accuracy'][str(k)][str(t)]:.3f}  " for t in args.levels))
    print(f"wrote {out}, {plot}")
    return 0
