"""The ``selfflow`` command: ``train``, ``sample``, ``modalities``, plus subcommands that installed
packages register under the ``selfflow.commands`` entry point group (e.g. ``selfflow eval``)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from pydantic import ValidationError

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before any Hugging Face import, in any subcommand

from .arg_types import (
    ExamplesFormatter,
    add_model_argument,
    device_name,
    finite_float,
    non_negative_int,
    positive_float,
    positive_int,
)
from .checkpoint import CheckpointLoadError, latest_checkpoint
from .config import ConfigError, load_config, validation_problems
from .distributed import launched_world_size, left_out_of_step, one_process_only
from .export_cli import add_export_parser
from .faults import RunInterrupted, RunStopped
from .registry import command_registrars, plugin_frame
from .safe_yaml import YamlError

if TYPE_CHECKING:
    from .timesteps import TimestepDistribution

EPILOG = """examples:
  selfflow train --config configs/tiny/image.yaml
  selfflow train --config configs/tiny/image.yaml --set objective.kind=flow_matching --set name=tiny-fm
  selfflow sample --run runs/tiny-image --num 40 --cfg-scale 3 --out grid.png
  selfflow sample --run runs/tiny-mixed --modality video --prompt "a red circle moving left" --out-dir out/
  torchrun --nproc_per_node=8 -m selfflow.core.cli sample --official-ckpt selfflow_imagenet256.pt \\
      --vae sd-vae-ft-ema --solver sde --steps 250 --num-samples 50000 --out-dir samples/selfflow
"""


def _timesteps_summary(ts: TimestepDistribution) -> str:
    """``t~logit_normal(0,1) shift 1``: the training timestep distribution before and after its shift."""
    args = {"uniform": (), "logit_normal": (ts.mean, ts.std),
            "plateau_logit_normal": (ts.mean, ts.std, ts.plateau)}[ts.kind]
    params = f"({','.join(f'{a:g}' for a in args)})" if args else ""
    return f"t~{ts.kind}{params} shift {ts.shift:g}"


def _objective_summary(trainer) -> str:
    """``self_flow (image: R_M=0.25, γ=0.8, t~uniform shift 1; layers 2→4)``: the objective as each
    modality resolved it."""
    objectives = trainer.run.objectives
    parts = [f"{n}: R_M={o.mask_ratio}, γ={o.gamma}, {_timesteps_summary(o.timesteps)}"
             for n, o in objectives.items()]
    first = next(iter(objectives.values()))
    layers = f"; layers {first.student_layer}→{first.teacher_layer}" if first.uses_projector else ""
    return f"{trainer.cfg.objective.kind} ({'; '.join(parts)}{layers})"


def _cmd_train(args: argparse.Namespace) -> int:
    from .distributed import torn_down_after
    from .trainer import Trainer

    cfg = load_config(args.config, args.set)
    with torn_down_after():
        trainer = Trainer(cfg, resume=not args.no_resume, resplit_data=args.resplit_data,
                          progress=not args.no_progress)
        with trainer.log.text_log():  # rank 0's console lines also go to <run_dir>/train.log
            return _train(trainer)


def _train(trainer) -> int:
    """Report, then train (a finished run is left as it is: no new checkpoint, samples or export)."""
    from .run_setup import cpu_settings_summary

    cfg, main_rank = trainer.cfg, trainer.dist.is_main
    log = logging.getLogger("selfflow")
    if main_rank:
        n = sum(p.numel() for p in trainer.raw.parameters())
        how = f"{trainer.dist.world_size} rank(s), {trainer.strategy}"
        where = f"{trainer.device} ({cpu_settings_summary()})" if trainer.device.type == "cpu" else trainer.device
        log.info(f"{cfg.name}: {n / 1e6:.2f}M parameters, {_objective_summary(trainer)}, {how}, {where}")
        if evaluation := trainer.previewer.summary():
            log.info(f"online evaluation {evaluation}")
        if trainer.resumed_from is not None:
            pending = "; its evaluation first, left pending by a stop" if trainer.eval_pending else ""
            log.info(f"resuming from {trainer.resumed_from} (step {trainer.step}{pending})")
    if trainer.step > cfg.train.steps and not trainer.finished and main_rank:
        log.warning(f"selfflow: warning: train.steps={cfg.train.steps} is below the checkpoint's step {trainer.step}: "
                    f"no step is trained; the final outputs are written at step {trainer.step}")
    if trainer.finished:
        if main_rank:
            log.info(f"{cfg.name} is already finished (step {trainer.step}, train.steps={cfg.train.steps}); "
                     f"nothing to do. Its outputs are in {cfg.run_dir}; raise train.steps to train further")
        return 0
    try:
        result = trainer.fit()
    except KeyboardInterrupt:  # Ctrl-C twice: stopped at once, without a checkpoint of the step in progress
        if main_rank:
            last = latest_checkpoint(cfg.run_dir / "checkpoints")
            log.warning("selfflow: stopped at once; the same command " + (
                f"resumes from {last}" if last else "starts the run over (no checkpoint was written yet)"))
        raise
    if main_rank:
        log.info(f"run directory: {cfg.run_dir}")
        lines = [("checkpoint", result["checkpoint"]), *(("samples", p) for p in result["previews"]),
                 ("loss_plot", result["loss_plot"]), ("eval_plot", result["eval_plot"]), ("ema", result["ema"])]
        for key, value in lines:
            if value is not None or key != "eval_plot":  # a run without online evaluation has no plot
                log.info(f"  {key:10s} {value}")
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    from .sampling_cli import run_sample

    return run_sample(args)


_PREPARE_TARGETS = "_selfflow_prepare_targets"


def missing_command(parser: argparse.ArgumentParser) -> int:
    """``selfflow``, ``selfflow prepare`` or ``selfflow eval`` without its command: the help on stderr and
    exit 2, argparse's code for a usage error."""
    parser.print_help(sys.stderr)
    return 2


def prepare_subparsers(subparsers: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """The target group of ``selfflow prepare`` (created on first use). A modality package's
    ``selfflow.commands`` registrar adds its dataset target (``imagenet``, ``video`` …) here, so no package
    has to know about the others."""
    targets = getattr(subparsers, _PREPARE_TARGETS, None)
    if targets is None:
        prep = subparsers.add_parser(
            "prepare", help="prepare a dataset (encode to latents, write shards)",
            description="Dataset preparation; each installed modality package adds its targets.")
        targets = prep.add_subparsers(dest="prepare_target", metavar="TARGET")
        prep.set_defaults(func=lambda args: missing_command(prep))
        setattr(subparsers, _PREPARE_TARGETS, targets)
    return targets


def _cmd_plan(args: argparse.Namespace) -> int:
    from .plan import format_plans, make_plans

    one_process_only("selfflow plan", "--gpus N plans for N GPUs without running on them")
    cfg = load_config(args.config, args.set)
    print(format_plans([(plan, args.batch or batch) for plan, batch in make_plans(cfg)], args.gpus, args.gpu_mem,
                       cfg.train.activation_checkpointing, cfg.train.compile))
    return 0


def _cmd_modalities(args: argparse.Namespace) -> int:
    """One line per installed modality; a plug-in that cannot load, or breaks the contract, says why."""
    from .plugin_report import MODALITIES, plugin_statuses

    statuses = plugin_statuses(MODALITIES)
    for status in statuses:
        print(status.name if status.error is None else f"{status.name}  (broken: {error_message(status.error)})")
    return 1 if any(status.error for status in statuses) else 0


def _cmd_plugins(args: argparse.Namespace) -> int:
    from .plugin_report import KINDS, plugin_statuses

    report = [(kind, plugin_statuses(kind)) for kind in KINDS]
    width = max(len(status.name) for _, statuses in report for status in statuses) + 2
    for kind, statuses in report:
        print(f"{kind.title} ({kind.setting}):")
        for status in statuses:
            what = status.source if status.error is None else f"broken: {error_message(status.error)}"
            print(f"  {status.name:<{width}}{what}")
    return 1 if any(status.error for _, statuses in report for status in statuses) else 0


def add_sample_arguments(smp: argparse.ArgumentParser) -> None:
    # --run-dir / --num-samples: spellings that torchrun's own parser does not mistake for --run-path/--numa-…
    add_model_argument(smp)
    smp.add_argument("--num", "--num-samples", dest="num", type=positive_int,
                     help="number of samples (default: one per prompt with prompts, else 40 for a grid, 50000 "
                          "with --out-dir)")
    smp.add_argument("--prompt", dest="prompts", action="append", metavar="TEXT",
                     help="text-conditioned runs: a prompt (repeatable); sample i gets prompt i mod P")
    smp.add_argument("--prompts", dest="prompt_file", type=Path, metavar="FILE",
                     help="prompts from a .txt (one per line) or .jsonl (a \"prompt\" or \"caption\" field per "
                          "line), after any --prompt; e.g. an evaluation set's captions")
    smp.add_argument("--steps", type=positive_int,
                     help="ODE steps / SDE model calls (default: the modality's resolved sampler)")
    smp.add_argument("--solver", choices=["euler", "heun", "sde"], help="ODE solver, or the official SDE")
    smp.add_argument("--cfg-scale", type=finite_float,
                     help="classifier-free guidance scale; ≤ 1: no guidance (the official sampler's rule)")
    smp.add_argument("--guidance-low", type=finite_float, help="apply CFG for t ≥ this (RF time)")
    smp.add_argument("--guidance-high", type=finite_float, help="apply CFG for t ≤ this (RF time; official 0.7)")
    smp.add_argument("--shift", type=finite_float, help="time shift of the ODE or SDE grid (1: uniform / official)")
    smp.add_argument("--seed", type=non_negative_int, help="noise seed (same seed → same samples; default 0, 31 with "
                                               "--official-repro)")
    smp.add_argument("--precision", choices=["fp32", "bf16"],
                     help="bf16: model under bfloat16 autocast (the GPU recipe; on a CPU fast only with AVX512-BF16 or "
                          "AMX, else ~100x slower, and it warns); default fp32")
    smp.add_argument("--weights", choices=["ema", "model"], default="ema", help="which weights to use")
    smp.add_argument("--modality", help="mixed runs: which modality to sample (default: the first), with its entry's sampler")
    smp.add_argument("--out", type=Path, help="grid path; the modality sets the suffix (.png, .mp4 + .gif, .wav), "
                                               "an existing folder gets sample_seed<S> inside it (default: "
                                               "RUN/samples/sample_seed<S>; a mixed run's: "
                                               "RUN/samples/<modality>/sample_seed<S>)")
    smp.add_argument("--device", type=device_name, default="auto", help="auto, cpu, cuda or cuda:N")
    many = smp.add_argument_group("many samples for evaluation (sharded over torchrun ranks, resumable)")
    many.add_argument("--out-dir", type=Path, help="write one file per sample as the evaluators read it (images "
                                                    "PNG, video clips uint8 (T, H, W, 3) .npy, audio WAV), "
                                                    "samples_N.npz (images) and (with prompts) prompts.jsonl here; the same "
                                                    "command resumes, a larger --num extends the samples")
    many.add_argument("--batch-size", type=positive_int, default=64, help="samples per forward")
    many.add_argument("--labels", choices=["random", "balanced"], default="random", help="class labels")
    many.add_argument("--png", action=argparse.BooleanOptionalAction, default=True, help="per-sample files")
    many.add_argument("--npz", action=argparse.BooleanOptionalAction, default=True,
                      help="ADM .npz (arr_0; arr_1: class labels)")
    many.add_argument("--official-ckpt", type=Path, help="a released checkpoint instead of --run")
    many.add_argument("--checkpoint-kind", help="which installed loader reads it (default: the only one)")
    many.add_argument("--vae", type=Path, help="local autoencoder directory for --official-ckpt")
    many.add_argument("--official-repro", action="store_true",
                      help="the official sample.py's per-batch seeds (31 + rank·100000 + batch), global "
                           "generator, bf16 autocast and uint8 truncation, to reproduce its samples_N.npz")
    many.add_argument("--official-world-size", type=positive_int,
                      help="--official-repro: GPUs of the official run to reproduce (default: this run's ranks)")
    many.add_argument("--no-progress", action="store_true", help="no progress bar")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``selfflow sample: error: …`` and where to read more, not the usage
    block (subcommands inherit the class through ``add_subparsers``)."""

    def __init__(self, *args, **kwargs) -> None:
        # every command's help shows its defaults and keeps its examples as written
        if kwargs.get("formatter_class", argparse.HelpFormatter) is argparse.HelpFormatter:
            kwargs["formatter_class"] = ExamplesFormatter
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        configs = [w for w in message.split() if w.endswith((".yaml", ".yml"))]
        if message.startswith("unrecognized arguments") and configs:  # `selfflow train run.yaml`
            message += f" — a config file goes after --config: --config {configs[0]}"
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="selfflow", description="Train, sample and evaluate Self-Flow models (arXiv 2603.06507).",
        epilog=EPILOG, formatter_class=ExamplesFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser(
        "train", help="train a model from a YAML config",
        description="Train Self-Flow (or a baseline: objective.kind=flow_matching) from a YAML run config. "
                    "The run directory (output_dir/name) receives config.yaml, train.log (the console "
                    "lines), checkpoints/, samples/, metrics.jsonl, tensorboard/ (losses and sample media), "
                    "loss.png and ema.safetensors. An existing run resumes from its newest complete "
                    "checkpoint; a finished one is left as it is (raise train.steps to train further).",
        epilog="examples:\n"
               "  selfflow train --config configs/tiny/image.yaml\n"
               "  selfflow train --config configs/tiny/image.yaml --set objective.kind=flow_matching --set name=tiny-fm\n"
               "  torchrun --nproc_per_node=8 -m selfflow.core.cli train --config configs/imagenet256/selfflow_sit_xl2.yaml",
        formatter_class=ExamplesFormatter)
    train.add_argument("--config", type=Path, help="YAML run config (default: built-in defaults)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set train.steps=200 (repeatable; value is YAML)")
    train.add_argument("--no-resume", action="store_true", help="start fresh even if checkpoints exist")
    train.add_argument("--resplit-data", action="store_true",
                       help="resume although the data's split changed (other number of ranks, batch per rank, "
                       "data-loader workers or shuffle buffer): each shard stream goes on from the start of its next "
                       "epoch, divided anew (not the samples the uninterrupted run would read). Without it such a "
                       "resume is refused")
    train.add_argument("--no-progress", action="store_true", help="no progress bar: a line per logging.every "
                       "steps instead (console and train.log), as when the output is not a terminal")
    train.set_defaults(func=_cmd_train)

    smp = sub.add_parser(
        "sample", help="generate samples from a trained run",
        description="Generate samples from a run directory's EMA weights (ema.safetensors, or the EMA "
                    "inside the newest checkpoint) and write them with the modality's writer (PNG grid …). "
                    "With --out-dir: N samples (default 50000, or one per prompt) as files plus an ADM .npz, "
                    "sharded over torchrun ranks and resumable; --official-ckpt samples a released checkpoint. "
                    "Text-conditioned runs take --prompt/--prompts; the output records each sample's prompt.",
        epilog="examples:\n"
               "  selfflow sample --run runs/tiny-image --num 40 --cfg-scale 4 --solver heun --steps 25\n"
               "  selfflow sample --run runs/tiny-mixed --modality audio --prompt \"a C major chord on a flute\"\n"
               "  selfflow sample --run runs/tiny-image --num 1000 --out-dir samples/tiny   # files + samples_1000.npz",
        formatter_class=ExamplesFormatter)
    add_sample_arguments(smp)
    smp.set_defaults(func=_cmd_sample)

    plan = sub.add_parser(
        "plan", help="parameters, FLOPs and GPU memory of a run config (no GPU needed)",
        description="Capacity planning: parameters, FLOPs per step, activation memory per micro-batch with "
                    "and without activation checkpointing, the memory resident per GPU (weights, AdamW, EMA; DDP's "
                    "gradient buckets) under DDP and FSDP2, the peak per GPU at the configured micro-batch (the "
                    "gradients come and go with each step) and the largest that fits, with a '!' line and what "
                    "would fit where the configured step does not; a mixed run per modality at its entry's batch. "
                    "Needs no GPU, weights or shards (robotics excepted: an rt1 plan reads the prepared data's "
                    "stats.json and the Wan VAE's config.json): absent autoencoders and shards stand in as their "
                    "published shapes; a caption encoder is read from its config.json alone (method: "
                    "selfflow.core.plan).",
        epilog="examples:\n"
               "  selfflow plan --config configs/imagenet256/selfflow_sit_xl2.yaml --gpus 8 --gpu-mem 80\n"
               "  selfflow plan --config configs/mixed_625m.yaml --gpus 8 --batch 16",
        formatter_class=ExamplesFormatter)
    plan.add_argument("--config", type=Path, help="YAML run config (default: the built-in defaults, a run named "
                      "'run')")
    plan.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    plan.add_argument("--gpus", type=positive_int, default=1, help="GPUs (FSDP2 shards over them; default 1)")
    plan.add_argument("--gpu-mem", type=positive_float, default=80.0, help="memory per GPU in GB, 1e9 bytes (default 80; "
                      "the plan prints GiB)")
    plan.add_argument("--batch", type=positive_int, help="micro-batch per GPU (default: the config's train.batch_size, "
                      "or each mixture entry's batch_size)")
    plan.set_defaults(func=_cmd_plan)

    add_export_parser(sub)

    mods = sub.add_parser("modalities", help="list installed modalities",
                          description="The modalities the installed packages register (data.modality in a "
                                      "config; pip install -e ./video etc. adds one). Each is loaded and "
                                      "checked: a plug-in that cannot serve says why, and the exit status is 1.")
    mods.set_defaults(func=_cmd_modalities)
    plugins = sub.add_parser("plugins", help="list and check every installed extension",
                             description="Every modality, backbone, objective kind and online evaluator the "
                                         "installed packages offer, with the entry point it comes from; each is "
                                         "loaded and checked as a run would, and one that cannot serve says why "
                                         "(exit status 1).")
    plugins.set_defaults(func=_cmd_plugins)

    for register in command_registrars().values():
        register(sub)
    return parser


def error_message(e: Exception) -> str:
    """One line naming the file, key or value: an OS error as ``<what went wrong>: <file>``, a validation
    error of a command's options as ``key: problem (got value)``."""
    if isinstance(e, ValidationError):
        return f"invalid {e.title} settings: " + "; ".join(validation_problems(e, "(options)"))
    if isinstance(e, KeyError) and e.args:
        return str(e.args[0])
    if isinstance(e, OSError) and e.strerror and e.filename is not None:
        return f"{e.strerror}: {e.filename}" + (f" -> {e.filename2}" if e.filename2 is not None else "")
    return str(e)


def _located(e: Exception) -> str | None:
    """``AttributeError: 'dict' object has no attribute 'media' (in plug-in code at FILE:LINE in encode; …)`` for an
    error a plug-in's own code raised (``None`` for core's): its author sees what and where in one line."""
    if (where := plugin_frame(e)) is None:
        return None
    what = repr(e.args[0]) if isinstance(e, KeyError) and e.args else error_message(e)
    return f"{type(e).__name__}: {what} (in plug-in code at {where}; SELFFLOW_TRACEBACK=1 prints the traceback)"


def _said_on_this_node(e: Exception) -> bool:
    """Under torchrun, an error in the arguments or the config is the same on every rank: local rank 0 prints
    it, once per node, instead of every rank printing the same line (each still exits with status 2)."""
    config_error = isinstance(e, (ConfigError, YamlError, ValidationError))
    return config_error and launched_world_size() > 1 and os.environ.get("LOCAL_RANK", "0") != "0"


def show_own_warnings() -> None:
    """Show a warning that selfflow's own code raises as one ``selfflow: warning: …`` line (with the rank under
    torchrun) instead of Python's form with a file, a line number and a source line, which point into
    selfflow rather than at what the user can change; a plug-in's or a library's warnings keep that form."""
    import selfflow

    if getattr(warnings.showwarning, "selfflow_form", False):  # main() called again in one process
        return
    python_form = warnings.showwarning
    # the folders of the selfflow namespace: one per installed selfflow package (core, image, eval …)
    folders = tuple(str(Path(folder).resolve()) + os.sep for folder in selfflow.__path__)

    def show(message, category, filename, lineno, file=None, line=None):
        if not str(Path(filename).resolve()).startswith(folders):
            return python_form(message, category, filename, lineno, file, line)
        rank = f" (rank {os.environ['RANK']})" if launched_world_size() > 1 else ""
        print(f"selfflow: warning{rank}: {message}", file=file or sys.stderr)

    show.selfflow_form = True  # type: ignore[attr-defined]
    warnings.showwarning = show


def main(argv: list[str] | None = None) -> int:
    show_own_warnings()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        return missing_command(parser)
    try:
        code = int(args.func(args) or 0)
    # The user can fix these: a bad file, key or value found past argument parsing (a ValueError names it;
    # pydantic's ValidationError is one). SELFFLOW_TRACEBACK=1 shows where it was raised.
    except (ConfigError, CheckpointLoadError, YamlError, OSError, KeyError, ValueError) as e:
        if os.environ.get("SELFFLOW_TRACEBACK"):
            raise
        if not _said_on_this_node(e):
            print(f"selfflow: error: {_located(e) or error_message(e)}", file=sys.stderr)
        code = 2
    except RunInterrupted as e:  # a stop signal: the step finished, its checkpoint written (rank 0 says where)
        if str(e):
            print(f"selfflow: stopped: {e}", file=sys.stderr)
        code = 128 + e.signum
    except KeyboardInterrupt:  # Ctrl-C (twice, in training): no traceback; what is complete on disk stays
        print("selfflow: interrupted", file=sys.stderr)
        code = 130
    except RunStopped as e:  # a deliberate stop (bad data, non-finite steps, failed checkpoint write)
        print(f"selfflow: stopped: {e}", file=sys.stderr)
        code = 3
    except Exception as e:  # any other error: a traceback, unless a plug-in's own code raised it
        if os.environ.get("SELFFLOW_TRACEBACK") or not (line := _located(e)):
            raise
        print(f"selfflow: error: {line}", file=sys.stderr)
        code = 2
    if left_out_of_step():  # the other ranks may wait in a collective: exit now, so that torchrun stops them
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # no process-group destructor, which could wait on that collective
    return code


if __name__ == "__main__":
    sys.exit(main())
