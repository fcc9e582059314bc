"""The training loop: Self-Flow (or a baseline) on one modality, with EMA, logging, samples, checkpoints.

Everything random in a step (noise, timesteps, masks, label dropout) comes from one generator whose
state is checkpointed with the model, optimizer, schedule and data position, so a resumed run continues
with the numbers an uninterrupted run would have produced.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import ValidationError
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import ConfigError, RunConfig, save_config
from .ema import ema_update, make_ema
from .generate import generate
from .metrics import MetricsLogger, plot_losses
from .mmdit import MMDiT, MMDiTConfig
from .modality import Modality
from .objective import ResolvedObjective, self_flow_loss
from .registry import get_modality


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA device is available")
    return torch.device(name)


def build_modality(cfg: RunConfig) -> Modality:
    """Instantiate the configured modality; option errors name ``data.options.<key>``."""
    cls = get_modality(cfg.data.modality)
    try:
        return cls(cfg.data.options)
    except ValidationError as e:
        lines = [f"invalid data.options for modality {cfg.data.modality!r}:"]
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"])
            lines.append(f"  data.options.{key}: {err['msg']} (got {err['input']!r})")
        raise ConfigError("\n".join(lines)) from None


def build_model_config(cfg: RunConfig, modality: Modality, uses_teacher: bool) -> MMDiTConfig:
    """The backbone config with the modality's projections, classes and (if needed) a projector."""
    update: dict[str, Any] = {"modalities": {modality.name: modality.token_channels},
                              "num_classes": modality.num_classes}
    if not uses_teacher:
        update["projector_mult"] = 0.0
    return cfg.model.model_copy(update=update)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on norms, biases and embeddings (every tensor with < 2 dims, and embeddings)."""
    decay, no_decay = [], []
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 or isinstance(module, nn.Embedding) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Trainer:
    def __init__(self, cfg: RunConfig, *, resume: bool = True, progress: bool = True):
        self.cfg = cfg
        self.progress = progress
        self.device = pick_device(cfg.train.device)
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        self.rank, self.world_size = 0, 1
        self.modality = build_modality(cfg)
        depth = cfg.model.depth
        try:
            self.objective: ResolvedObjective = cfg.objective.resolve(
                depth, self.modality.default_mask_ratio, self.modality.default_timesteps)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.model_cfg = build_model_config(cfg, self.modality, self.objective.uses_teacher)

        torch.manual_seed(cfg.train.seed)
        self.model = MMDiT(self.model_cfg).to(self.device)
        self.ema = make_ema(self.model)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                           betas=cfg.optim.betas, eps=cfg.optim.eps)
        warmup = cfg.optim.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.train.seed * 1000 + self.rank)
        self.stream = self.modality.stream(cfg.train.batch_size, cfg.train.seed, self.rank, self.world_size)
        self.step = 0
        self.skipped_steps = 0

        self.run_dir = cfg.run_dir
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.sample_dir = self.run_dir / "samples"
        ckpt = latest_checkpoint(self.ckpt_dir) if resume else None
        if ckpt is not None:
            self.load_state_dict(load_checkpoint(ckpt, map_location=self.device))
        self.resumed_from = ckpt

    # --- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "stream": self.stream.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "skipped_steps": self.skipped_steps,
            "config": yaml.safe_dump(self.cfg.model_dump(mode="json")),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.stream.load_state_dict(state["stream"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))

    def save(self) -> Path:
        return save_checkpoint(self.state_dict(), self.ckpt_dir, self.step, self.cfg.train.keep_last)

    def export_ema(self, path: str | Path | None = None) -> Path:
        """EMA weights as safetensors (+ the resolved config beside them) for sampling and sharing."""
        path = Path(path or self.run_dir / "ema.safetensors")
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.ema.state_dict().items()}
        save_file(tensors, str(path), metadata={"model_config": self.model_cfg.model_dump_json()})
        return path

    # --- one step ---------------------------------------------------------------------------------
    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        tokens, cond = self.modality.encode(batch, self.device)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16,
                                  enabled=self.cfg.train.precision == "bf16")
        with autocast:
            losses = self_flow_loss(self.model, self.ema if self.objective.uses_teacher else None, tokens,
                                    cond, self.objective, null_label=self.model.null_label,
                                    modality=self.modality.name, generator=self.generator)
        loss = losses["loss"]
        out = {k: float(v.detach()) for k, v in losses.items()}
        if not math.isfinite(out["loss"]):
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            return {**out, "skipped": 1.0}
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        if not torch.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            return {**out, "grad_norm": float(grad_norm), "skipped": 1.0}
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        ema_update(self.ema, self.model, self.cfg.ema.decay)
        return {**out, "grad_norm": float(grad_norm)}

    # --- loop -------------------------------------------------------------------------------------
    def write_samples(self) -> Path:
        s = self.cfg.sample
        model = self.ema if s.use_ema else self.model
        media, labels = generate(model, self.modality, s.num_samples, s, s.seed, self.device)
        return self.modality.save_samples(media, labels, self.sample_dir / f"step_{self.step:08d}")

    def fit(self) -> dict[str, Any]:
        cfg = self.cfg.train
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.run_dir / "config.yaml")
        logger = MetricsLogger(self.run_dir, resume_step=self.step)
        data = iter(self.stream)
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not self.progress, dynamic_ncols=True,
                   desc=f"train {self.cfg.name}")
        last: dict[str, float] = {}
        window_t, window_n = 0.0, 0
        try:
            while self.step < cfg.steps:
                t0 = time.perf_counter()
                batch = next(data)
                last = self.train_step(batch)
                self.step += 1
                window_t += time.perf_counter() - t0
                window_n += 1
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    sps = window_n * cfg.batch_size * self.world_size / max(window_t, 1e-9)
                    record = {"step": self.step, **last, "lr": self.scheduler.get_last_lr()[0],
                              "samples_per_s": sps, "skipped_steps": self.skipped_steps}
                    logger.log(record)
                    bar.set_postfix(loss=f"{last['loss']:.4f}", rep=f"{last['loss_rep']:.3f}",
                                    sps=f"{sps:.0f}")
                    window_t, window_n = 0.0, 0
                if cfg.plot_every and self.step % cfg.plot_every == 0:
                    plot_losses(logger.path, self.run_dir / "loss.png")
                if cfg.sample_every and self.step % cfg.sample_every == 0 and self.step < cfg.steps:
                    self.write_samples()
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
                    self.save()
        finally:
            bar.close()
            logger.close()
        ckpt = self.save()
        grid = self.write_samples()
        plot = plot_losses(logger.path, self.run_dir / "loss.png")
        ema_path = self.export_ema()
        return {"checkpoint": ckpt, "samples": grid, "loss_plot": plot, "ema": ema_path, "last": last}
