"""The training loop: Self-Flow (or a baseline) on one modality — single process, DDP or FSDP2.

Everything random in a step (noise, timesteps, masks, label dropout) comes from one generator with the
same seed on every rank; each rank keeps its slice of the global draw (:class:`StepNoise`). Its state is
checkpointed with the model, EMA, optimizer, schedule and data position, so a resumed run — on the same
or another number of ranks — continues with the numbers an uninterrupted run would have produced.
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

from . import parallel
from .backbones import build_backbone
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import ConfigError, RunConfig, save_config
from .distributed import all_mean, barrier, init_distributed
from .ema import ema_update, make_ema
from .flops import train_step_flops
from .generate import generate
from .metrics import MetricsLogger, plot_losses
from .modality import Batch, Modality
from .objective import ResolvedObjective, self_flow_loss
from .registry import get_evaluator, get_modality


class NonFiniteLossError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


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


def build_model_config(cfg: RunConfig, modality: Modality, uses_teacher: bool) -> Any:
    """The backbone config with the modality's projections, classes, text-context width and (if needed)
    a projector."""
    update: dict[str, Any] = {"modalities": {modality.name: modality.token_channels},
                              "num_classes": modality.num_classes, "context_dim": modality.context_dim}
    if not uses_teacher:
        update["projector_mult"] = 0.0
    return cfg.model.model_copy(update=update)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on norms, biases and embeddings (every tensor with < 2 dims, and embeddings)."""
    decay, no_decay = [], []
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if p.requires_grad:
                (no_decay if p.ndim < 2 or isinstance(module, nn.Embedding) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then constant or cosine down to ``min_ratio``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class Trainer:
    def __init__(self, cfg: RunConfig, *, resume: bool = True, progress: bool = True):
        self.cfg = cfg
        tc = cfg.train
        self.dist = init_distributed(pick_device(tc.device))
        self.device = self.dist.device
        self.progress = progress and self.dist.is_main
        if tc.num_threads:
            torch.set_num_threads(tc.num_threads)
        if self.device.type == "cuda" and tc.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.modality = build_modality(cfg)
        try:
            self.objective: ResolvedObjective = cfg.objective.resolve(
                cfg.model.depth, self.modality.default_mask_ratio, self.modality.default_timesteps)
            self.strategy = parallel.resolve_strategy(tc.parallel, self.dist)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.model_cfg = build_model_config(cfg, self.modality, self.objective.uses_projector)
        bf16 = tc.precision == "bf16"

        torch.manual_seed(tc.seed)
        raw = build_backbone(self.model_cfg).to(self.device)
        raw.activation_checkpointing = tc.activation_checkpointing
        ema = make_ema(raw)
        if tc.compile:
            for block in [*raw.blocks(), *ema.blocks()]:
                block.compile()
        self.model = parallel.wrap_student(raw, self.strategy, self.dist, bf16)
        self.ema = parallel.wrap_teacher(ema, self.strategy, bf16)
        self.raw = parallel.unwrap(self.model)
        self.optimizer = torch.optim.AdamW(param_groups(self.raw, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                           betas=cfg.optim.betas, eps=cfg.optim.eps)
        o = cfg.optim
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, o.warmup_steps, tc.steps, o.schedule, o.min_lr_ratio))
        # Same seed on every rank: each rank slices its part of the global draw (StepNoise.draw).
        self.generator = torch.Generator(device=self.device).manual_seed(tc.seed * 1000 + 17)
        self.stream = self.modality.stream(tc.batch_size, tc.seed, self.dist.rank, self.dist.world_size)
        self.step = 0
        self.skipped_steps = 0
        self.nonfinite_in_a_row = 0

        self.run_dir = cfg.run_dir
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.sample_dir = self.run_dir / "samples"
        ckpt = latest_checkpoint(self.ckpt_dir) if resume else None
        if ckpt is not None:
            self.load_state_dict(load_checkpoint(ckpt, map_location="cpu"))
        self.resumed_from = ckpt

    @property
    def objective_name(self) -> str:
        o = self.objective
        return f"{self.cfg.objective.kind} (R_M={o.mask_ratio}, γ={o.gamma}, layers {o.student_layer}→{o.teacher_layer})"

    @property
    def global_batch(self) -> int:
        return self.cfg.train.batch_size * self.dist.world_size * self.cfg.train.grad_accum_steps

    # --- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Full (unsharded) training state; a collective under FSDP2 (call on every rank)."""
        return {
            "step": self.step,
            "model": parallel.full_model_state(self.model),
            "ema": parallel.full_model_state(self.ema),
            "optimizer": parallel.full_optimizer_state(self.model, self.optimizer),
            "scheduler": self.scheduler.state_dict(),
            "stream": self.stream.state_dict(),
            "generator": self.generator.get_state().cpu(),
            "skipped_steps": self.skipped_steps,
            "world_size": self.dist.world_size,
            "config": yaml.safe_dump(self.cfg.model_dump(mode="json")),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        parallel.load_full_model_state(self.model, state["model"])
        parallel.load_full_model_state(self.ema, state["ema"])
        parallel.load_full_optimizer_state(self.model, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.stream.load_state_dict(state["stream"])
        self.generator.set_state(state["generator"].to(self.generator.get_state().device))
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))

    def save(self) -> Path | None:
        state = self.state_dict()
        path = None
        if self.dist.is_main:
            path = save_checkpoint(state, self.ckpt_dir, self.step, self.cfg.train.keep_last)
        barrier()
        return path

    def export_ema(self, path: str | Path | None = None) -> Path | None:
        """EMA weights as safetensors (+ the resolved model config) for sampling and sharing."""
        tensors = parallel.full_model_state(self.ema)
        if not self.dist.is_main:
            return None
        path = Path(path or self.run_dir / "ema.safetensors")
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"model_config": self.model_cfg.model_dump_json()})
        tmp.replace(path)
        return path

    # --- one optimizer step -----------------------------------------------------------------------
    def train_step(self, batches: list[Batch]) -> dict[str, float]:
        """One optimizer step over ``len(batches)`` accumulation micro-batches; returns rank-mean values."""
        accum = len(batches)
        sums = {"loss": 0.0, "loss_fm": 0.0, "loss_rep": 0.0}
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16,
                                  enabled=self.cfg.train.precision == "bf16")
        # Every micro-step replays the same global draw and takes its slice: micro-batch i of rank r holds
        # global samples (i·W + r)·B …, exactly as the data stream lays them out. So (ranks × accumulation)
        # splits of one global batch train on identical numbers.
        rng_state = self.generator.get_state()
        world, rank = self.dist.world_size, self.dist.rank
        for i, batch in enumerate(batches):
            self.generator.set_state(rng_state)
            tokens, cond = self.modality.encode(batch, self.device)
            self.tokens_per_sample = tokens.x.shape[1]
            with parallel.grad_sync(self.model, i == accum - 1), autocast:
                losses = self_flow_loss(self.model, self.ema if self.objective.uses_teacher else None, tokens,
                                        cond, self.objective, null_label=self.raw.null_label,
                                        modality=self.modality.name, generator=self.generator,
                                        shard=(i * world + rank, accum * world))
                # Always backward, even on a non-finite loss: every rank must join the gradient reduction.
                (losses["loss"] / accum).backward()
            for k in sums:
                sums[k] += float(losses[k].detach()) / accum
        grad_norm = torch.nn.utils.clip_grad_norm_(self.raw.parameters(), self.cfg.optim.grad_clip)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        out = all_mean(sums, self.device)
        out["grad_norm"] = float(grad_norm)
        if not (math.isfinite(out["loss"]) and math.isfinite(out["grad_norm"])):
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            self.nonfinite_in_a_row += 1
            if self.nonfinite_in_a_row >= self.cfg.train.max_nonfinite_steps:
                last = latest_checkpoint(self.ckpt_dir)
                raise NonFiniteLossError(
                    f"{self.nonfinite_in_a_row} optimizer steps in a row had a non-finite loss or gradient "
                    f"(at step {self.step}); stopping. The last good checkpoint is {last or 'none'}. "
                    "Lower optim.lr, check the data, or raise train.max_nonfinite_steps.")
            return {**out, "skipped": 1.0}
        self.nonfinite_in_a_row = 0
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        ema_update(self.ema, self.raw, self.cfg.ema.decay)
        return out

    # --- loop -------------------------------------------------------------------------------------
    def write_samples(self) -> Path | None:
        s = self.cfg.sample
        model = self.ema if s.use_ema else self.model
        if self.strategy != "fsdp2" and not self.dist.is_main:
            barrier()
            return None
        media, labels = generate(model, self.modality, s.num_samples, s, s.seed, self.device)
        path = (self.modality.save_samples(media, labels, self.sample_dir / f"step_{self.step:08d}")
                if self.dist.is_main else None)
        if self.strategy != "fsdp2":
            barrier()
        return path

    def evaluate(self) -> dict[str, float]:
        """Online evaluation: generate ``train.eval_samples`` with the EMA and score them with the
        modality's evaluator (e.g. probe-FD on synthetic shapes). Empty if the modality has none."""
        name = self.modality.evaluator
        if name is None:
            return {}
        if getattr(self, "_evaluator", None) is None:
            self._evaluator = get_evaluator(name)(self.modality)
        s = self.cfg.sample
        model = self.ema if s.use_ema else self.model
        if self.strategy != "fsdp2" and not self.dist.is_main:
            barrier()
            return {}
        media, labels = generate(model, self.modality, self.cfg.train.eval_samples, s, s.seed + 1, self.device)
        out = self._evaluator(media, labels) if self.dist.is_main else {}
        if self.strategy != "fsdp2":
            barrier()
        return out

    def _throughput(self, seconds: float, steps: int) -> dict[str, float]:
        samples_s = steps * self.global_batch / max(seconds, 1e-9)
        out = {"samples_per_s": samples_s, "tokens_per_s": samples_s * self.tokens_per_sample}
        tc = self.cfg.train
        if tc.peak_tflops:
            flops = train_step_flops(self.raw, self.tokens_per_sample, teacher_layer=(
                self.objective.teacher_layer if self.objective.uses_teacher else None))
            out["mfu"] = flops * samples_s / (tc.peak_tflops * 1e12 * self.dist.world_size)
        if self.device.type == "cuda":
            out["gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return out

    def _wandb(self):
        if not (self.cfg.train.wandb and self.dist.is_main):
            return None
        try:
            import wandb
        except ImportError:
            print("train.wandb is on but wandb is not installed; logging to metrics.jsonl/TensorBoard only")
            return None
        return wandb.init(project=self.cfg.train.wandb_project, name=self.cfg.name,
                          config=self.cfg.model_dump(mode="json"), resume="allow")

    def fit(self) -> dict[str, Any]:
        tc = self.cfg.train
        main = self.dist.is_main
        logger = None
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.run_dir / "config.yaml")
            logger = MetricsLogger(self.run_dir, resume_step=self.step)
        wb = self._wandb()
        data = iter(self.stream)
        bar = tqdm(total=tc.steps, initial=self.step, disable=not self.progress, dynamic_ncols=True,
                   desc=f"train {self.cfg.name}", unit="step")
        last: dict[str, float] = {}
        window_t, window_n = 0.0, 0
        try:
            while self.step < tc.steps:
                t0 = time.perf_counter()
                last = self.train_step([next(data) for _ in range(tc.grad_accum_steps)])
                self.step += 1
                window_t += time.perf_counter() - t0
                window_n += 1
                bar.update(1)
                if self.step % tc.log_every == 0 or self.step == tc.steps:
                    record = {"step": self.step, **last, "lr": self.scheduler.get_last_lr()[0],
                              **self._throughput(window_t, window_n), "skipped_steps": self.skipped_steps}
                    window_t, window_n = 0.0, 0
                    if logger is not None:
                        logger.log(record)
                    if wb is not None:
                        wb.log(record, step=self.step)
                    bar.set_postfix(loss=f"{last['loss']:.4f}", rep=f"{last['loss_rep']:.3f}",
                                    sps=f"{record['samples_per_s']:.0f}", tps=f"{record['tokens_per_s']:.0f}")
                if main and tc.plot_every and self.step % tc.plot_every == 0:
                    plot_losses(logger.path, self.run_dir / "loss.png")
                if tc.sample_every and self.step % tc.sample_every == 0 and self.step < tc.steps:
                    self.write_samples()
                if tc.eval_every and (self.step % tc.eval_every == 0 or self.step == tc.steps):
                    scores = self.evaluate()
                    if logger is not None and scores:
                        logger.log({"step": self.step, **scores})
                        bar.write(f"step {self.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in scores.items()))
                if tc.checkpoint_every and self.step % tc.checkpoint_every == 0 and self.step < tc.steps:
                    self.save()
        finally:
            bar.close()
            if logger is not None:
                logger.close()
        ckpt = self.save()
        grid = self.write_samples()
        ema_path = self.export_ema()
        plot = plot_losses(logger.path, self.run_dir / "loss.png") if main else None
        if wb is not None:
            wb.finish()
        return {"checkpoint": ckpt, "samples": grid, "loss_plot": plot, "ema": ema_path, "last": last}
