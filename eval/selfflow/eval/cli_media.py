"""``selfflow eval t2i | fvd | fad``: the argparse side of the image-text, video and audio metrics.

Each ``add_*_parser(subparsers)`` is a registrar named in :mod:`selfflow.eval.registry`; its handler
imports the metric module only when it runs and prints the results as JSON (also to ``--out``).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from selfflow.core.arg_types import (
    PreformattedFormatter,
    device_name,
    non_negative_int,
    output_file,
    positive_int,
    resolve_device,
)
from selfflow.core.atomic import atomic_write_text
from selfflow.core.config import ConfigError

from .clap import VARIANTS
from .cli import one_process
from .clip_score import WEIGHTS_HELP as CLIP_WEIGHTS_HELP
from .dinov2 import WEIGHTS_HELP as DINOV2_WEIGHTS_HELP
from .frechet import MetricNote
from .fvd import MAX_CLIPS, MAX_FRAMES_FID, NUM_FRAMES
from .i3d import WEIGHTS_HELP as I3D_WEIGHTS_HELP
from .video_io import is_stats_file


def notes_as_lines(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Run a metric command with its :class:`MetricNote` warnings printed once each as ``note: …`` lines at the
    end, as ``eval adm`` prints its notes — not as Python warnings with a source line; other warnings pass on."""
    @functools.wraps(run)
    def wrapped(args: argparse.Namespace) -> int:
        caught: list[warnings.WarningMessage] = []
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                return run(args)
        finally:  # outside the recording: the others go through the filters as they came
            for message in dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, MetricNote)):
                print(f"note: {message}", file=sys.stderr)
            for w in caught:
                if not issubclass(w.category, MetricNote):
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return wrapped


def report_results(results: dict[str, Any], out: str | Path | None) -> int:
    """Print ``results`` as JSON, write it to ``out`` when given; returns the exit code (0)."""
    text = json.dumps(results, indent=2)
    print(text)
    if out:
        atomic_write_text(out, text + "\n")
    return 0


def recorded_prompts(folder: str | Path) -> dict[str, Any] | None:
    """A summary of ``folder/prompts.jsonl`` (written by ``selfflow sample --out-dir`` for text-conditioned
    runs: each sample's file and prompt), or ``None`` without one. Every file it lists must be in ``folder``."""
    from selfflow.core.prompts import PROMPTS_FILE, read_prompt_records

    path = Path(folder) / PROMPTS_FILE
    if not path.is_file():
        return None
    records = read_prompt_records(path)
    missing = [r["file"] for r in records if r["file"] is None or not (Path(folder) / r["file"]).is_file()]
    if missing:
        raise FileNotFoundError(f"{path} lists {len(missing)} sample(s) missing from {folder}, e.g. {missing[0]}")
    return {"file": str(path), "n": len(records), "distinct": len({r["prompt"] for r in records})}


def _run_t2i(args: argparse.Namespace) -> int:
    from .clip_score import clip_score, read_prompts
    from .dinov2 import fd_dinov2

    one_process("t2i")
    prompts = args.prompts or (recorded_prompts(args.images) or {}).get("file")
    if bool(args.dinov2) != bool(args.ref):  # one of a pair is a metric the user expects, silently dropped
        raise ConfigError("FD-DINOv2 needs both --dinov2 DIR and --ref (real images or their statistics)")
    if args.clip and not prompts:
        raise ConfigError(f"the CLIP score needs --prompts FILE, or {args.images}/prompts.jsonl as "
                          "`selfflow sample --out-dir` writes it")
    results: dict[str, Any] = {}
    device = resolve_device(args.device)
    if args.dinov2:
        results["fd_dinov2"] = fd_dinov2(args.images, args.ref, args.dinov2, batch_size=args.batch_size,
                                         device=device, save_real_stats=args.save_ref_stats)
    if args.clip:
        files, texts = read_prompts(prompts, args.images)
        results["clip_score"] = clip_score(files, texts, args.clip, batch_size=args.batch_size, device=device)
    if not results:
        raise ConfigError("nothing to compute: give --dinov2 with --ref, and/or --clip (with --prompts, or samples "
                          "whose prompts.jsonl pairs them)")
    return report_results(results, args.out)


def add_t2i_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``t2i`` (FD-DINOv2 and CLIP score) to an argparse subparsers object."""
    parser = subparsers.add_parser(
        "t2i", help="text-to-image metrics: FD-DINOv2 and CLIP score",
        formatter_class=PreformattedFormatter,
        description=(
            "FD-DINOv2 (dgm-eval protocol) between --images and --ref, and/or CLIP score "
            "(ViT-L/14, mean of 100*max(cos,0)) of --images against --prompts.\n\n"
            "Inputs: --images is a folder of generated images (png/jpg, any size). --ref is a "
            "folder of reference images or a .npz of DINOv2 statistics saved by --save-ref-stats. "
            "--prompts is a .jsonl ({\"image\": \"relative/path.png\", \"prompt\": \"...\"} per "
            "line) or a .txt with one prompt per line in the sorted order of --images; without it, "
            "--images/prompts.jsonl (written by `selfflow sample --out-dir` with prompts) pairs them.\n\n"
            "Weights (local directories, nothing is downloaded):\n"
            f"  --dinov2: {DINOV2_WEIGHTS_HELP}\n"
            f"  --clip:   {CLIP_WEIGHTS_HELP}"))
    parser.add_argument("--images", required=True, help="folder of generated images")
    parser.add_argument("--ref", help="reference image folder or DINOv2 stats .npz")
    parser.add_argument("--prompts", help="prompts (.jsonl or .txt) paired with --images (default: "
                                          "IMAGES/prompts.jsonl when present)")
    parser.add_argument("--dinov2", help="local Hugging Face DINOv2 ViT-L/14 directory "
                                         "(facebook/dinov2-large)")
    parser.add_argument("--clip", help="local Hugging Face CLIP directory "
                                       "(openai/clip-vit-large-patch14)")
    parser.add_argument("--save-ref-stats", help="write the reference DINOv2 stats to this .npz")
    parser.add_argument("--batch-size", type=positive_int, default=50, help="images per forward (default 50)")
    parser.add_argument("--device", type=device_name, default="auto", help="auto (cuda if available), cpu, cuda:N")
    parser.add_argument("--out", type=output_file, help="also write the JSON results to this file")
    parser.set_defaults(func=notes_as_lines(_run_t2i))
    return parser


def _run_fvd(args: argparse.Namespace) -> int:
    from .fvd import fid_frames, fvd

    one_process("fvd")
    if args.frames_fid and not args.real_frames and is_stats_file(args.real):
        raise ConfigError("--real is a statistics file of I3D features: give --real-frames (videos or "
                          "Inception statistics) for framewise FID")
    results: dict[str, Any] = {}
    device = resolve_device(args.device)
    if args.i3d:
        results["fvd"] = fvd(args.fake, args.real, args.i3d, num_frames=args.frames,
                             start=args.clip_start, stride=args.stride, max_clips=args.max_clips,
                             batch_size=args.batch_size, device=device, save_real_stats=args.save_real_stats)
    if args.frames_fid:
        results["fid_frames"] = fid_frames(args.fake, args.real_frames or args.real,
                                           args.inception, max_frames=args.max_frames, device=device)
    if not results:
        raise ConfigError(f"nothing to compute: give --i3d PATH for FVD ({I3D_WEIGHTS_HELP}) and/or --frames-fid")
    if prompts := recorded_prompts(args.fake):
        results["prompts"] = prompts
    return report_results(results, args.out)


def add_fvd_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``fvd`` (FVD and framewise FID) to an argparse subparsers object."""
    parser = subparsers.add_parser(
        "fvd", help="video metrics: FVD (StyleGAN-V) and framewise FID",
        formatter_class=PreformattedFormatter,
        description=(
            "FVD with the StyleGAN-V protocol (fvd2048_16f) and, with --frames-fid, framewise "
            "FID, between --fake and --real.\n\n"
            "Inputs: folders of videos, one per entry: .npy/.npz uint8 (T, H, W, 3) arrays, "
            ".gif, folders of frame images, or .mp4/.webm/... (needs PyAV). One 16-frame clip "
            "per video (--clip-start, --stride); shorter videos are skipped and counted. --real "
            "may be a .npz of I3D statistics written earlier with --save-real-stats.\n\n"
            "Weights (local files, nothing is downloaded):\n"
            f"  --i3d: {I3D_WEIGHTS_HELP}\n"
            "  --inception: the FID Inception weights of selfflow.eval.inception "
            "(pt_inception-2015-12-05-6726825d.pth)"))
    parser.add_argument("--fake", required=True, help="folder of generated videos")
    parser.add_argument("--real", required=True, help="folder of real videos or I3D stats .npz")
    parser.add_argument("--i3d", help="path of i3d_torchscript.pt (enables FVD)")
    parser.add_argument("--frames", type=positive_int, default=NUM_FRAMES, help="frames per clip")
    parser.add_argument("--clip-start", type=non_negative_int, default=0, help="first frame of each clip")
    parser.add_argument("--stride", type=positive_int, default=1, help="frame subsampling factor")
    parser.add_argument("--max-clips", type=positive_int, default=MAX_CLIPS, help="clips per set")
    parser.add_argument("--save-real-stats", help="write the real I3D statistics to this .npz")
    parser.add_argument("--frames-fid", action="store_true", help="also compute framewise FID")
    parser.add_argument("--real-frames", help="real videos or Inception stats .npz for framewise "
                                              "FID (default: --real)")
    parser.add_argument("--inception", help="FID Inception weights file")
    parser.add_argument("--max-frames", type=positive_int, default=MAX_FRAMES_FID,
                        help="frames per set for framewise FID")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="clips per I3D batch")
    parser.add_argument("--device", type=device_name, default="auto", help="auto (cuda if available), cpu, cuda:N")
    parser.add_argument("--out", type=output_file, help="also write the JSON results to this file")
    parser.set_defaults(func=notes_as_lines(_run_fvd))
    return parser


def _run_fad(args: argparse.Namespace) -> int:
    from .clap import convert_checkpoint
    from .fad import fad

    one_process("fad")
    if args.convert_from:
        if not (args.convert_to and args.variant):
            raise ConfigError("--convert-from needs --convert-to DIR and --variant")
        out = convert_checkpoint(args.convert_from, args.convert_to, args.variant)
        print(f"wrote {out}")
        return 0
    models = {"clap": args.clap, "clap_m": args.clap_m, "clap_a": args.clap_a}
    if not (args.fake and args.real) or not any(models.values()):
        raise ConfigError("give --fake, --real and at least one of --clap / --clap-m / --clap-a")
    results: dict[str, Any] = {VARIANTS[k].key: fad(args.fake, args.real, path, k, batch_size=args.batch_size,
                                                    fp16=not args.no_fp16, device=resolve_device(args.device))
                               for k, path in models.items() if path}
    if prompts := recorded_prompts(args.fake):
        results["prompts"] = prompts
    return report_results(results, args.out)


def add_fad_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``fad`` (FAD with CLAP / CLAP-M / CLAP-A, and checkpoint conversion)."""
    lines = "\n".join(f"  {k:7s} {v.paper_name:7s} = fadtk {v.fadtk_name}: {v.checkpoint} "
                      f"({v.arch}, {v.sample_rate} Hz, {v.window_s} s windows), {v.url}"
                      for k, v in VARIANTS.items())
    parser = subparsers.add_parser(
        "fad", help="audio metric: FAD with CLAP embeddings (fadtk protocol)",
        formatter_class=PreformattedFormatter,
        description=(
            "FAD between --fake and --real with the fadtk protocol (mono, resample, 16-bit PCM, "
            "windows every 1 s over the whole file, zero-padded, one embedding per window).\n\n"
            "Inputs: folders of .wav (other formats need soundfile). --real may be a .npz of "
            "statistics (fadtk's fma_pop.npz, or one written by selfflow.eval.fad.fad(..., "
            "save_real_stats=PATH)).\n\n"
            "Variants and weights (the paper-name mapping is inferred, see README_media.md):\n"
            f"{lines}\n\n"
            "Weights are local directories: a Hugging Face ClapModel directory for the LAION "
            "variants (laion/clap-htsat-unfused is 630k-audioset-best.pt), or a directory "
            "converted from the original file with\n"
            "  selfflow eval fad --convert-from FILE --convert-to DIR --variant clap_a|clap_m|clap"))
    parser.add_argument("--fake", help="folder of generated audio")
    parser.add_argument("--real", help="folder of reference audio or statistics .npz")
    parser.add_argument("--clap", help="MS-CLAP 2023 directory (converted)")
    parser.add_argument("--clap-m", help="LAION music CLAP directory")
    parser.add_argument("--clap-a", help="LAION audio CLAP directory")
    parser.add_argument("--no-fp16", action="store_true",
                        help="keep float32 embeddings (fadtk rounds them to float16)")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="windows per forward")
    parser.add_argument("--device", type=device_name, default="auto", help="auto (cuda if available), cpu, cuda:N")
    parser.add_argument("--out", type=output_file, help="also write the JSON results to this file")
    parser.add_argument("--convert-from", help="original checkpoint (.pt / .pth) to convert")
    parser.add_argument("--convert-to", help="output directory of the conversion")
    parser.add_argument("--variant", choices=sorted(VARIANTS), help="variant being converted")
    parser.set_defaults(func=notes_as_lines(_run_fad))
    return parser
