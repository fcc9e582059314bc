"""``selfflow sample``: a preview grid from a run, or many samples for evaluation (``--out-dir``)."""

from __future__ import annotations

import argparse
import glob
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .config import ConfigError
from .distributed import init_distributed, one_process_only, torn_down_after
from .generate import generate, sampler_config
from .modality import Modality
from .official_repro import OFFICIAL_SEED
from .pretrained import load_model, model_root
from .prompts import PROMPTS_FILE, gather_prompts, write_grid_prompts
from .registry import checkpoint_loaders
from .run_setup import pick_device
from .sample_many import SampleManyConfig, sample_many
from .sampler import SamplerConfig


def _load_official(args: argparse.Namespace, device: torch.device) -> tuple[Any, Any, SamplerConfig]:
    loaders = checkpoint_loaders()
    if not loaders:
        raise ConfigError("--official-ckpt needs a package that registers a 'selfflow.checkpoints' loader "
                          "(pip install -e ./image)")
    name = args.checkpoint_kind or next(iter(loaders))
    if name not in loaders:
        raise ConfigError(f"unknown checkpoint kind {name!r}; installed: {sorted(loaders)}")
    return loaders[name](args.official_ckpt, {"vae": args.vae, "device": device})


def _sampler(base: Any, args: argparse.Namespace, modality: Modality) -> SamplerConfig:
    """The sampler the flags ask for; on an unconditional model, a note for the flags that cannot apply there."""
    if not (modality.num_classes or modality.context_dim):
        given = {"--cfg-scale": args.cfg_scale is not None, "--guidance-low": args.guidance_low is not None,
                 "--guidance-high": args.guidance_high is not None,
                 "--labels": getattr(args, "labels", "random") != "random"}
        if idle := [flag for flag, on in given.items() if on]:
            print(f"note: {', '.join(idle)}: no effect on an unconditional model ({modality.name!r} has no classes "
                  "or captions to guide by)", file=sys.stderr)
    return sampler_config(base, steps=args.steps, solver=args.solver, cfg_scale=args.cfg_scale, shift=args.shift,
                          precision=args.precision, guidance_low=args.guidance_low, guidance_high=args.guidance_high)


def note_guidance_vs_evaluation(args: argparse.Namespace, sampler: SamplerConfig, modality: Modality,
                                eval_cfg: float) -> None:
    """Many samples are made for metrics: when the run's own sampler guides them (its ``sample.cfg_scale``, for
    previews) but its online evaluation does not (``eval.cfg_scale``, 1 as the paper's metrics), say so —
    the two sets of numbers would not compare."""
    if args.cfg_scale is None and (modality.num_classes or modality.context_dim) and sampler.cfg_scale != eval_cfg:
        print(f"note: sampling with the run's CFG scale {sampler.cfg_scale:g} (sample.cfg_scale); its online "
              f"evaluation and the paper's metrics use {eval_cfg:g} (eval.cfg_scale): add --cfg-scale {eval_cfg:g} "
              "for numbers comparable with those", file=sys.stderr)


def eval_hint(modality: Modality, run: Path | None, out_dir: Path, npz: Path | None) -> str | None:
    """The ``selfflow eval`` command that fits what was sampled (``None`` when none does): the probe of a run
    on built-in labelled data — unless the samples follow prompts (``prompts.jsonl``), which the probe never
    reads — else the modality's own suggestion (:meth:`Modality.evaluation_hint`)."""
    paired = (out_dir / PROMPTS_FILE).is_file()
    if modality.evaluator and run is not None and not paired:
        return ("the model's probe metrics on its synthetic data (the probe makes its own samples from the model; "
                f"it does not read these files):\n  selfflow eval probe --run {model_root(run)}")
    return modality.evaluation_hint(out_dir, npz, paired)


def _siblings(path: Path) -> dict[Path, int]:
    """The files named ``path.stem`` + any suffix, with their mtimes: what a modality writes beside its grid
    (a video's ``.gif`` next to its ``.mp4``, captions' ``.txt``) shows up as new or changed ones."""
    if not path.parent.is_dir():
        return {}
    return {p: p.stat().st_mtime_ns for p in path.parent.glob(glob.escape(path.stem) + ".*") if p.is_file()}


def _sample_grid(args: argparse.Namespace, prompts: list[str] | None) -> int:
    if args.run is None:
        raise ConfigError("selfflow sample needs --run RUN (or --official-ckpt PATH --out-dir DIR)")
    one_process_only("selfflow sample without --out-dir (one grid)", "--out-dir DIR shares many samples out "
                     "among the ranks")
    loaded = load_model(args.run, args.device, getattr(args, "modality", None), args.weights, args.locations)
    sampler = _sampler(loaded.config.sampler(loaded.modality), args, loaded.modality)
    device = next(loaded.model.parameters()).device
    n = args.num or (len(prompts) if prompts else 40)
    with torch.inference_mode(), tqdm(total=sampler.steps, desc="sampling", unit="step", leave=False,
                                      disable=args.no_progress or None) as bar:
        media, labels = generate(loaded.model, loaded.modality, n, sampler, args.seed, device, bar.update,
                                 prompts=prompts)
    # a mixed run's modalities keep their own folder, as the training previews do
    where = model_root(args.run) / "samples" / (loaded.modality.name if loaded.config.data.mixture else "")
    out = args.out or where / f"sample_seed{args.seed}"
    if out.is_dir():  # an existing folder: the grid goes inside it under its default name
        out = out / f"sample_seed{args.seed}"
    out.parent.mkdir(parents=True, exist_ok=True)
    before = _siblings(out)
    written = loaded.modality.save_samples(media, labels, out)
    beside = [p.name for p, mtime in _siblings(written).items() if p != written and before.get(p) != mtime]
    print(f"wrote {written}" + (f" (and {', '.join(beside)} beside it)" if beside else ""))
    if args.out is not None and args.out.suffix and written.name != args.out.name and not args.out.is_dir():
        print(f"note: {loaded.modality.name} grids are written as {written.suffix} (--out {args.out} named "
              f"{args.out.suffix!r})", file=sys.stderr)
    if prompts is not None:  # captions drawn from the run's data are the modality's own <grid>.txt
        print(f"wrote {write_grid_prompts(written, prompts, n)}")
    return 0


def check_flag_combinations(args: argparse.Namespace) -> None:
    """Flags that cannot apply together, or without the mode they belong to, are errors rather than ignored."""
    many = args.out_dir is not None or args.official_ckpt is not None
    if args.out is not None and many:
        raise ConfigError("--out names a grid; with --out-dir / --official-ckpt the samples go to --out-dir")
    if args.run is not None and args.official_ckpt is not None:
        raise ConfigError("give --run RUN or --official-ckpt PATH, not both")
    if args.official_ckpt is None:
        for flag, value in (("--vae", args.vae), ("--checkpoint-kind", args.checkpoint_kind)):
            if value is not None:
                raise ConfigError(f"{flag} applies to --official-ckpt only")
    if not many:
        used = [flag for flag, set_ in (("--labels balanced", args.labels != "random"), ("--no-png", not args.png),
                                        ("--no-npz", not args.npz),
                                        ("--official-world-size", args.official_world_size is not None))
                if set_]
        if used:
            raise ConfigError(f"{', '.join(used)}: for many samples only (add --out-dir DIR)")
    elif not (args.png or args.npz):
        raise ConfigError("--no-png with --no-npz would write no samples")


def run_sample(args: argparse.Namespace) -> int:
    check_flag_combinations(args)
    many = args.out_dir is not None or args.official_ckpt is not None
    if args.official_repro and not many:
        raise ConfigError("--official-repro writes many samples: add --out-dir DIR (or --official-ckpt PATH)")
    if args.seed is None:
        args.seed = OFFICIAL_SEED if args.official_repro else 0
    prompts = gather_prompts(args.prompts, args.prompt_file)
    if prompts is not None and args.official_ckpt is not None:
        raise ConfigError("--prompt/--prompts: the released checkpoints are class-conditional")
    if not many:
        return _sample_grid(args, prompts)

    with torn_down_after():
        dist = init_distributed(pick_device(args.device))
        if args.official_ckpt is not None:
            model, modality, base = _load_official(args, dist.device)
        elif args.run is not None:
            loaded = load_model(args.run, dist.device, getattr(args, "modality", None), args.weights,
                                args.locations)
            model, modality, base = loaded.model, loaded.modality, loaded.config.sampler(loaded.modality)
        else:
            raise ConfigError("--out-dir needs --run RUN or --official-ckpt PATH")
        sampler = _sampler(base, args, modality)
        if args.run is not None and dist.is_main:
            note_guidance_vs_evaluation(args, sampler, modality, loaded.config.eval.cfg_scale)
        out_dir = args.out_dir or (model_root(args.run or Path("samples")) / "samples" / f"eval_seed{args.seed}")
        opts = SampleManyConfig(num=args.num or (len(prompts) if prompts else 50_000), batch_size=args.batch_size,
                                seed=args.seed, labels=args.labels, png=args.png, npz=args.npz, out_dir=out_dir,
                                official_repro=args.official_repro, official_world_size=args.official_world_size,
                                prompts=prompts)
        npz = sample_many(model.to(dist.device), modality, sampler, opts, dist, progress=not args.no_progress)
    if dist.is_main:
        print(f"samples in {opts.out_dir}")
        if npz is not None:
            print(f"wrote {npz}")
        hint = eval_hint(modality, args.run, opts.out_dir, npz)
        if hint:
            print(hint)
    return 0
