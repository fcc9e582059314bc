"""``selfflow eval …``: registered with the core CLI through the ``selfflow.commands`` entry point.

The subcommands are the :data:`selfflow.eval.registry.METRICS`; each registrar receives the ``eval``
subparsers object, adds its parser and sets ``func=handler`` (handler(args) -> exit code). A
registrar module that fails to import (a missing optional dependency) leaves a stub subcommand that
reports the error instead of breaking the whole ``selfflow`` CLI; handlers import torch and the
networks only when they run. This module holds the Inception commands (adm, stats) and the probe.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable
from typing import Any

from selfflow.core.arg_types import (
    ExamplesFormatter,
    add_model_argument,
    device_name,
    finite_float,
    non_negative_int,
    output_file,
    positive_int,
    resolve_device,
)
from selfflow.core.atomic import atomic_write_text

from .registry import METRICS, load

EPILOG = """examples:
  selfflow eval adm VIRTUAL_imagenet256_labeled.npz samples.npz --inception pt_inception-2015-12-05-6726825d.pth --out metrics.json
  selfflow eval adm ref_stats.npz samples_dir/ --out metrics.json      # weights from $SELFFLOW_WEIGHTS
  selfflow eval stats images_dir/ --out ref_stats.npz --keep-features
"""


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Entry point for the core CLI: adds ``selfflow eval`` and its subcommands."""
    from selfflow.core.cli import missing_command

    parser = subparsers.add_parser(
        "eval", help="evaluate samples (ADM FID/sFID/IS/precision/recall, reference statistics, …)",
        description="Evaluation metrics. Weights are never downloaded: pass local files (Inception's is also "
                    "found in $SELFFLOW_WEIGHTS, a directory that holds it).",
        epilog=EPILOG, formatter_class=ExamplesFormatter)
    sub = parser.add_subparsers(dest="eval_command", metavar="METRIC")
    for name, metric in METRICS.items():
        try:
            registrar = load(metric.command)
        except ImportError as e:
            stub = sub.add_parser(name, help=f"(unavailable: {e})")
            stub.set_defaults(func=lambda args, e=e: _fail(e))
            continue
        registrar(sub)
    parser.set_defaults(func=lambda args: missing_command(parser))
    return parser


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--inception", metavar="PATH",
                   help="pt_inception-2015-12-05-6726825d.pth (default: $SELFFLOW_WEIGHTS/<that name>)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per forward (ADM: 64)")
    p.add_argument("--device", type=device_name, default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 …")
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
    p.add_argument("--out", type=output_file, help="write the metrics as JSON here")
    p.add_argument("--fp32-distances", action="store_true",
                   help="exact float32 distances for precision/recall (ADM uses float16)")
    p.set_defaults(func=cmd_adm)


def add_stats_parser(sub: Any) -> None:
    p = sub.add_parser(
        "stats", help="compute and cache Inception statistics of an image folder or npz",
        description="Writes mu, sigma (pool_3) and mu_s, sigma_s (spatial) with counts, in the ADM "
                    "reference layout, for use as REF in 'selfflow eval adm'.")
    p.add_argument("src", help="image folder or .npz with arr_0")
    p.add_argument("--out", type=output_file, required=True, help="output .npz")
    p.add_argument("--keep-features", action="store_true",
                   help="also store the pool_3 features (pool_3, N×2048) for precision/recall")
    _add_common(p)
    p.set_defaults(func=cmd_stats)


def _run(args: argparse.Namespace, body: Callable[[Any, bool], int], inputs: list[str], statistics_ok: bool) -> int:
    """Join torchrun's process group if any (core's restart-safe setup, which also picks this rank's
    GPU), load the network, run ``body(model, is_main)``; input errors become exit code 2. The ``inputs``
    (image folders or ``.npz`` files; of statistics too when ``statistics_ok``) are checked first: a typo or a
    file of another kind is reported before the network loads."""
    from selfflow.core.distributed import init_distributed, torn_down_after

    from .adm_eval import check_feature_input
    from .frechet import MetricNote
    from .inception import load_inception

    try:
        for path in inputs:
            check_feature_input(path, statistics_ok=statistics_ok)
    except (OSError, KeyError, ValueError) as e:
        return _fail(e)
    try:
        # torn_down_after: an error on one rank leaves no barrier the others could be waiting past
        with torn_down_after(), warnings.catch_warnings():
            warnings.simplefilter("ignore", MetricNote)  # printed once, as a note of the results
            dist = init_distributed(resolve_device(args.device))
            return body(load_inception(args.inception, device=dist.device), dist.is_main)
    except (OSError, KeyError, ValueError) as e:  # OSError: PIL's unreadable image among them
        return _fail(e)


def one_process(command: str) -> None:
    """Refuse ``selfflow eval command`` (which does not shard its work) under torchrun with several ranks."""
    from selfflow.core.distributed import one_process_only

    one_process_only(f"selfflow eval {command}", "only adm and stats shard their work over ranks")


def _fail(e: Exception) -> int:
    """Report an input error as core's ``main`` reports those that reach it (the probe's, the media
    metrics'): one ``selfflow: error:`` line, exit code 2."""
    from selfflow.core.cli import error_message

    print(f"selfflow: error: {error_message(e)}", file=sys.stderr)
    return 2


def cmd_adm(args: argparse.Namespace) -> int:
    from .adm_eval import evaluate_adm, format_adm

    def body(model: Any, is_main: bool) -> int:
        metrics = evaluate_adm(args.ref, args.samples, model, batch_size=args.batch_size,
                               fp16_distances=not args.fp32_distances, progress=not args.no_progress)
        if not is_main:
            return 0
        for note in metrics["notes"]:
            print(f"note: {note}", file=sys.stderr)
        print(format_adm(metrics))
        if args.out is not None:
            atomic_write_text(args.out, json.dumps(metrics, indent=2) + "\n")
            print(f"wrote {args.out}")
        return 0

    return _run(args, body, [args.ref, args.samples], statistics_ok=True)


def cmd_stats(args: argparse.Namespace) -> int:
    from .adm_eval import compute_stats_file

    def body(model: Any, is_main: bool) -> int:
        info = compute_stats_file(args.src, model, args.out, keep_features=args.keep_features,
                                  batch_size=args.batch_size, progress=not args.no_progress)
        if is_main:
            print(f"wrote {info['out']} ({info['count']} images, keys: {', '.join(info['keys'])})")
        return 0

    return _run(args, body, [args.src], statistics_ok=False)


def _run_probe(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from selfflow.core.generate import generate, sampler_config
    from selfflow.core.pretrained import load_model, model_root

    from .registry import evaluators, load

    one_process("probe")
    loaded = load_model(args.run, args.device, weights=args.weights, locations=args.locations)
    model, modality, cfg = loaded.model, loaded.modality, loaded.config
    if modality.evaluator not in ("shapes_probe", "digits_probe"):
        raise ValueError(f"{args.run} does not train on synthetic shapes or digits; the probe only applies there")
    # metrics: no CFG unless asked; validated like `selfflow sample`'s flags (sde needs ≥ 2 steps …)
    sampler = sampler_config(cfg.sampler(modality), steps=args.steps,
                             cfg_scale=cfg.eval.cfg_scale if args.cfg_scale is None else args.cfg_scale)
    device = next(model.parameters()).device
    with tqdm(total=sampler.steps, desc=f"sampling {args.num}", unit="step", leave=False,
              disable=args.no_progress or None) as bar:
        media, labels = generate(model, modality, args.num, sampler, args.seed, device, bar.update)
    evaluator = load(evaluators()[modality.evaluator])(modality)
    scores = evaluator(media, labels)
    from .frechet import MetricNote, frechet_notes

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MetricNote)  # printed below with the result, once
        dim = len(getattr(getattr(evaluator, "reference", None), "mean", ()))
        notes = frechet_notes("probe_fd", scores["probe_fd"], dim=dim, counts={"generated": args.num}) if dim else []
    # The same scores of as many real images: the floor at this sample count (small-N bias included), to read
    # the model's numbers against.
    real, real_labels = evaluator.real_images(args.num)
    floor = {"num_images": len(real), **evaluator(real, real_labels)}
    result = {**scores, "real_images": floor,
              "protocol": f"{modality.evaluator}-v1 (a proxy on built-in data, not FID)",
              "run": str(args.run), "modality": modality.name, "num_samples": args.num,
              "sampler": sampler.model_dump(), "notes": notes}
    if cfg.data.mixture:  # a mixed run: say which of its modalities was scored
        print(f"probe on the {modality.name!r} samples of a mixed run "
              f"({', '.join(e.modality for e in cfg.data.mixture)})")
    out = args.out or model_root(args.run) / "probe_metrics.json"
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    print(f"probe_fd {scores['probe_fd']:.4f}   probe_acc {scores['probe_acc']:.3f}   ({args.num} samples)")
    print(f"real images: probe_fd {floor['probe_fd']:.4f}   probe_acc {floor['probe_acc']:.3f}   "
          f"({floor['num_images']} held-out images: the floor at this count)")
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {out}")
    return 0


def add_probe_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "probe", help="probe-FD and conditional accuracy of a run on synthetic shapes or digits (no downloads)",
        description="Generate samples from a run trained on a built-in labelled dataset (synthetic shapes, "
                    "digits) and score them with "
                    "a small probe CNN trained on the dataset's labels (cached in $SELFFLOW_CACHE or "
                    "~/.cache/selfflow): probe_fd (Fréchet distance in the probe's feature space, lower is "
                    "better) and probe_acc (fraction of samples recognised as their class). A proxy for "
                    "comparing runs on the toy data, not FID.")
    add_model_argument(p, required=True)
    p.add_argument("--num", "--num-samples", dest="num", type=positive_int, default=500,
                   help="samples to generate (classes cycle; default 500)")
    p.add_argument("--steps", type=positive_int, help="sampler steps (default: the run's resolved sampler)")
    p.add_argument("--cfg-scale", type=finite_float,
                   help="guidance scale (default: the run's eval.cfg_scale; ≤ 1: no guidance)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="sampling seed")
    p.add_argument("--weights", choices=["ema", "model"], default="ema",
                   help="the run's EMA weights, or its newest checkpoint's model weights")
    p.add_argument("--device", type=device_name, default="auto", help="auto (cuda if available), cpu, cuda:N")
    p.add_argument("--out", type=output_file, help="JSON output (default: RUN/probe_metrics.json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_probe)
    return p
