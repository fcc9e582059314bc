"""``selfflow eval …``: registered with the core CLI through the ``selfflow.commands`` entry point.

Subcommands live in :data:`EVAL_SUBCOMMANDS` (name → ``"module:function"``); each function receives
the ``eval`` subparsers object, adds its parser and sets ``func=handler`` (handler(args) -> exit
code). A registrar module that fails to import (a missing optional dependency) leaves a stub
subcommand that reports the error instead of breaking the whole ``selfflow`` CLI; handlers import
torch and the networks only when they run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

# name → "module:function(subparsers)". Other metrics (fvd, fad, t2i) are added here.
EVAL_SUBCOMMANDS: dict[str, str] = {
    "adm": "selfflow.eval.cli:add_adm_parser",
    "stats": "selfflow.eval.cli:add_stats_parser",
    "t2i": "selfflow.eval.clip_score:add_cli",
    "fvd": "selfflow.eval.fvd:add_cli",
    "fad": "selfflow.eval.fad:add_cli",
    "probe": "selfflow.eval.probe:add_cli",
}

EPILOG = """examples:
  selfflow eval adm VIRTUAL_imagenet256_labeled.npz samples.npz --inception pt_inception-2015-12-05-6726825d.pth --out metrics.json
  selfflow eval adm ref_stats.npz samples_dir/ --out metrics.json      # weights from $SELFFLOW_WEIGHTS
  selfflow eval stats images_dir/ --out ref_stats.npz --keep-features
"""


def _load_registrar(spec: str) -> Callable[[Any], None]:
    module, _, func = spec.partition(":")
    return getattr(importlib.import_module(module), func)


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Entry point for the core CLI: adds ``selfflow eval`` and its subcommands."""
    parser = subparsers.add_parser(
        "eval", help="evaluate samples (ADM FID/sFID/IS/precision/recall, reference statistics, …)",
        description="Evaluation metrics. Weights are never downloaded: pass local files or set "
                    "$SELFFLOW_WEIGHTS to a directory that holds them.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="eval_command", metavar="METRIC")
    for name, spec in EVAL_SUBCOMMANDS.items():
        try:
            registrar = _load_registrar(spec)
        except ImportError as e:
            stub = sub.add_parser(name, help=f"(unavailable: {e})")
            stub.set_defaults(func=lambda args, e=e: _fail(e))
            continue
        registrar(sub)
    parser.set_defaults(func=lambda args: _no_subcommand(parser))
    return parser


def _no_subcommand(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 1


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--inception", metavar="PATH",
                   help="pt_inception-2015-12-05-6726825d.pth (default: $SELFFLOW_WEIGHTS/<that name>)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward (ADM: 64)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 …")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_adm_parser(sub: Any) -> None:
    p = sub.add_parser(
        "adm", help="FID, sFID, IS, precision, recall as the ADM (guided-diffusion) evaluator",
        description="ADM evaluator protocol: TF Inception-v3 2015-12-05 features, TF1 bilinear resize, "
                    "FID/sFID vs the reference statistics, IS over 5000-sample splits, precision/recall "
                    "(k=3) vs the reference images. REF: ADM reference batch (arr_0 + mu/sigma/mu_s/"
                    "sigma_s), a stats file from 'selfflow eval stats', or an image folder. SAMPLES: "
                    "an .npz with arr_0 (uint8 N×H×W×3) or an image folder (PNG/JPEG).")
    p.add_argument("ref", help="reference .npz or image folder")
    p.add_argument("samples", help="samples .npz (arr_0) or image folder")
    _add_common(p)
    p.add_argument("--out", type=Path, help="write the metrics as JSON here")
    p.add_argument("--fp32-distances", action="store_true",
                   help="exact float32 distances for precision/recall (ADM uses float16)")
    p.set_defaults(func=cmd_adm)


def add_stats_parser(sub: Any) -> None:
    p = sub.add_parser(
        "stats", help="compute and cache Inception statistics of an image folder or npz",
        description="Writes mu, sigma (pool_3) and mu_s, sigma_s (spatial) with counts, in the ADM "
                    "reference layout, for use as REF in 'selfflow eval adm'.")
    p.add_argument("src", help="image folder or .npz with arr_0")
    p.add_argument("--out", type=Path, required=True, help="output .npz")
    p.add_argument("--keep-features", action="store_true",
                   help="also store the pool_3 features (pool_3, N×2048) for precision/recall")
    _add_common(p)
    p.set_defaults(func=cmd_stats)


def _device(name: str) -> Any:
    import torch

    if name in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))  # one GPU per rank
    return torch.device("cpu" if name == "auto" else name)


def _init_distributed(device: Any) -> bool:
    """Under torchrun (WORLD_SIZE > 1) start a process group if nobody did; True if we started it."""
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _load_model(args: argparse.Namespace) -> Any:
    from .inception import load_inception

    return load_inception(args.inception, device=_device(args.device))


def _run(args: argparse.Namespace, body: Callable[[Any], int]) -> int:
    """Resolve the device, join torchrun's process group if any, map input errors to exit code 2."""
    import torch.distributed as dist

    started = _init_distributed(_device(args.device))
    try:
        return body(_load_model(args))
    except (FileNotFoundError, KeyError, ValueError) as e:
        return _fail(e)
    finally:
        if started:
            dist.destroy_process_group()


def _fail(e: Exception) -> int:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    print(f"selfflow eval: error: {msg}", file=sys.stderr)
    return 2


def cmd_adm(args: argparse.Namespace) -> int:
    from .adm_eval import evaluate_adm, format_adm

    def body(model: Any) -> int:
        metrics = evaluate_adm(args.ref, args.samples, model, batch_size=args.batch_size,
                               fp16_distances=not args.fp32_distances, progress=not args.no_progress)
        if _rank() != 0:
            return 0
        for note in metrics["notes"]:
            print(f"note: {note}", file=sys.stderr)
        print(format_adm(metrics))
        if args.out is not None:
            _write_json(args.out, metrics)
            print(f"wrote {args.out}")
        return 0

    return _run(args, body)


def cmd_stats(args: argparse.Namespace) -> int:
    from .adm_eval import compute_stats_file

    def body(model: Any) -> int:
        info = compute_stats_file(args.src, model, args.out, keep_features=args.keep_features,
                                  batch_size=args.batch_size, progress=not args.no_progress)
        if _rank() == 0:
            print(f"wrote {info['out']} ({info['count']} images, keys: {', '.join(info['keys'])})")
        return 0

    return _run(args, body)


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)
