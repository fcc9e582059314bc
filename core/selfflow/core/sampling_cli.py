"""``selfflow sample``: load a run's weights and write samples with the modality's writer."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file

from .backbones import build_backbone
from .checkpoint import latest_checkpoint, load_checkpoint
from .config import ConfigError, load_config
from .generate import generate
from .trainer import build_modality, build_model_config, pick_device


def load_run_model(run_dir: Path, weights: str = "ema", device: str = "auto"):
    """``(model, modality, cfg)`` of a run directory, from ``ema.safetensors`` or the newest checkpoint."""
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise ConfigError(f"{run_dir} is not a run directory: {cfg_path} is missing")
    cfg = load_config(cfg_path)
    modality = build_modality(cfg)
    uses_teacher = cfg.objective.resolve(cfg.model.depth, modality.default_mask_ratio,
                                         modality.default_timesteps).uses_teacher
    model_cfg = build_model_config(cfg, modality, uses_teacher)
    dev = pick_device(device)
    model = build_backbone(model_cfg)
    ema_file = run_dir / "ema.safetensors"
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    if weights == "ema" and ema_file.is_file():
        state = load_file(str(ema_file))
    elif ckpt is not None:
        state = load_checkpoint(ckpt)[weights]
    else:
        raise FileNotFoundError(f"no weights in {run_dir}: neither {ema_file} nor checkpoints/step_*.pt")
    model.load_state_dict(state)
    return model.to(dev).eval(), modality, cfg


def run_sample(args: argparse.Namespace) -> int:
    model, modality, cfg = load_run_model(args.run, args.weights, args.device)
    update = {k: v for k, v in {"steps": args.steps, "solver": args.solver, "cfg_scale": args.cfg_scale,
                                "shift": args.shift}.items() if v is not None}
    sampler = cfg.sample.model_copy(update=update)
    device = next(model.parameters()).device
    with torch.inference_mode():
        media, labels = generate(model, modality, args.num, sampler, args.seed, device)
    out = args.out or args.run / "samples" / f"sample_seed{args.seed}"
    path = modality.save_samples(media, labels, out)
    print(f"wrote {path}")
    return 0
