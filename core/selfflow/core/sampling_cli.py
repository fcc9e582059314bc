"""``selfflow sample``: a preview grid from a run, or many samples for evaluation (``--out-dir``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError
from .distributed import destroy, init_distributed
from .generate import generate
from .official_repro import OFFICIAL_SEED
from .registry import checkpoint_loaders
from .run_setup import load_run_model, pick_device
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


def _sampler(base: SamplerConfig, args: argparse.Namespace) -> SamplerConfig:
    update = {k: v for k, v in {"steps": args.steps, "solver": args.solver, "cfg_scale": args.cfg_scale,
                                "shift": args.shift, "precision": args.precision}.items() if v is not None}
    if args.guidance_high is not None or args.guidance_low is not None:
        lo, hi = base.guidance_interval
        update["guidance_interval"] = (args.guidance_low if args.guidance_low is not None else lo,
                                       args.guidance_high if args.guidance_high is not None else hi)
    return SamplerConfig.model_validate({**base.model_dump(include=set(SamplerConfig.model_fields)), **update})


def run_sample(args: argparse.Namespace) -> int:
    many = args.out_dir is not None or args.official_ckpt is not None
    if args.official_repro and not many:
        raise ConfigError("--official-repro writes many samples: add --out-dir DIR (or --official-ckpt PATH)")
    if args.seed is None:
        args.seed = OFFICIAL_SEED if args.official_repro else 0
    if not many:
        if args.run is None:
            raise ConfigError("selfflow sample needs --run RUN (or --official-ckpt PATH --out-dir DIR)")
        model, modality, cfg = load_run_model(args.run, args.weights, args.device, getattr(args, "modality", None))
        sampler = _sampler(cfg.sample, args)
        device = next(model.parameters()).device
        with torch.inference_mode():
            media, labels = generate(model, modality, args.num or 40, sampler, args.seed, device)
        out = args.out or args.run / "samples" / f"sample_seed{args.seed}"
        print(f"wrote {modality.save_samples(media, labels, out)}")
        return 0

    dist = init_distributed(pick_device(args.device))
    try:
        if args.official_ckpt is not None:
            model, modality, base = _load_official(args, dist.device)
        elif args.run is not None:
            model, modality, cfg = load_run_model(args.run, args.weights, dist.device, getattr(args, "modality", None))
            base = cfg.sample
        else:
            raise ConfigError("--out-dir needs --run RUN or --official-ckpt PATH")
        sampler = _sampler(base, args)
        out_dir = args.out_dir or ((args.run or Path("samples")) / "samples" / f"eval_seed{args.seed}")
        opts = SampleManyConfig(num=args.num or 50_000, batch_size=args.batch_size, seed=args.seed,
                                labels=args.labels, png=args.png, npz=args.npz, out_dir=out_dir,
                                official_repro=args.official_repro, official_world_size=args.official_world_size)
        npz = sample_many(model.to(dist.device), modality, sampler, opts, dist, progress=not args.no_progress)
    finally:
        destroy()
    if dist.is_main:
        print(f"samples in {opts.out_dir}")
        if npz is not None:
            print(f"wrote {npz}\nevaluate with (ImageNet 256; ADM's reference batch):\n"
                  f"  selfflow eval adm VIRTUAL_imagenet256_labeled.npz {npz}")
    return 0
