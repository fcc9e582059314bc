"""The training loop: Self-Flow (or a baseline) on one modality or a mixture — single process, DDP or FSDP2.

Everything random in a step (noise, timesteps, masks, label dropout) comes from one generator with the
same seed on every rank; each rank keeps its slice of the global draw (:class:`StepNoise`). In a mixed
run, the modality of each step comes from a seeded :class:`ModalitySchedule`, identical on every rank.
All of it is checkpointed with the model, EMA, optimizer, schedule and data positions, so a resumed run
— on the same or another number of ranks — continues with the numbers an uninterrupted run would have
produced.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file
from tqdm import tqdm

from . import faults, parallel
from .backbones import build_backbone
from .checkpoint import CheckpointWriteError, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import ConfigError, RunConfig, save_config
from .distributed import all_mean, barrier, broadcast_object, init_distributed
from .ema import ema_update, make_ema
from .flops import train_step_flops
from .generate import generate
from .metrics import MetricsLogger, plot_losses
from .mixture import ModalitySchedule
from .modality import Batch
from .objective import ResolvedObjective, self_flow_loss
from .registry import get_evaluator
from .run_setup import (  # noqa: F401 - re-exported for callers of the former trainer helpers
    build_modalities,
    build_modality,
    build_model_config,
    freeze,
    init_from,
    lr_factor,
    param_groups,
    pick_device,
    read_init_weights,
    resolve_objectives,
)


class NonFiniteLossError(faults.RunStopped):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


class BadDataError(faults.RunStopped):
    """Too large a fraction of the samples read were corrupt (``train.max_bad_data_fraction``)."""


# The bad-data fraction is only judged after this many samples: a few early corrupt ones are not a trend.
MIN_SAMPLES_FOR_BAD_FRACTION = 64


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
        self.modalities = build_modalities(cfg)
        self.modality = next(iter(self.modalities.values()))  # the only one in single-modality runs
        self.entries = {e.modality: e for e in cfg.data.entries()}
        self.objectives: dict[str, ResolvedObjective] = resolve_objectives(cfg, self.modalities)
        try:
            self.strategy = parallel.resolve_strategy(tc.parallel, self.dist)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.objective = self.objectives[self.modality.name]
        uses_projector = any(o.uses_projector for o in self.objectives.values())
        self.model_cfg = build_model_config(cfg, self.modalities, uses_projector)
        bf16 = tc.precision == "bf16"

        torch.manual_seed(tc.seed)
        raw = build_backbone(self.model_cfg).to(self.device)
        raw.activation_checkpointing = tc.activation_checkpointing
        self.init_report: dict[str, list[str]] | None = None
        if tc.init_from and not (resume and latest_checkpoint(cfg.run_dir / "checkpoints")):
            try:
                self.init_report = init_from(raw, read_init_weights(tc.init_from, tc.init_weights))
            except ValueError as e:
                raise ConfigError(str(e)) from None
        self.frozen_params = freeze(raw, tc.freeze)
        ema = make_ema(raw)
        if tc.compile:
            for block in [*raw.blocks(), *ema.blocks()]:
                block.compile()
        # A mixed step touches one modality's projections only: DDP must expect unused parameters.
        self.model = parallel.wrap_student(raw, self.strategy, self.dist, bf16,
                                           find_unused=len(self.modalities) > 1 or bool(tc.freeze))
        self.ema = parallel.wrap_teacher(ema, self.strategy, bf16)
        self.raw = parallel.unwrap(self.model)
        self.optimizer = torch.optim.AdamW(param_groups(self.raw, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                           betas=cfg.optim.betas, eps=cfg.optim.eps)
        o = cfg.optim
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, o.warmup_steps, tc.steps, o.schedule, o.min_lr_ratio))
        # Same seed on every rank: each rank slices its part of the global draw (StepNoise.draw).
        self.generator = torch.Generator(device=self.device).manual_seed(tc.seed * 1000 + 17)
        self.schedule = ModalitySchedule({n: e.weight for n, e in self.entries.items()}, tc.seed * 1000 + 29)
        self.streams = {n: m.stream(self.batch_size(n), tc.seed, self.dist.rank, self.dist.world_size)
                        for n, m in self.modalities.items()}
        self.stream = self.streams[self.modality.name]
        self.step = 0
        self.skipped_steps = 0
        self.data_samples = 0  # samples trained on (global), for the bad-data fraction
        self.nonfinite_in_a_row = 0
        self.tokens_per_sample: dict[str, int] = {}

        self.run_dir = cfg.run_dir
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.sample_dir = self.run_dir / "samples"
        ckpt = latest_checkpoint(self.ckpt_dir) if resume else None
        if ckpt is not None:
            self.load_state_dict(load_checkpoint(ckpt, map_location="cpu"))
        self.resumed_from = ckpt

    @property
    def mixed(self) -> bool:
        return len(self.modalities) > 1

    def batch_size(self, name: str) -> int:
        """Per-rank micro-batch of a modality."""
        return self.entries[name].batch_size or self.cfg.train.batch_size

    def global_batch(self, name: str | None = None) -> int:
        return (self.batch_size(name or self.modality.name) * self.dist.world_size
                * self.cfg.train.grad_accum_steps)

    @property
    def objective_name(self) -> str:
        parts = [f"{n}: R_M={o.mask_ratio}, γ={o.gamma}" for n, o in self.objectives.items()]
        o = self.objective
        return f"{self.cfg.objective.kind} ({'; '.join(parts)}; layers {o.student_layer}→{o.teacher_layer})"

    # --- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Full (unsharded) training state; a collective under FSDP2 (call on every rank)."""
        return {
            "step": self.step,
            "model": parallel.full_model_state(self.model),
            "ema": parallel.full_model_state(self.ema),
            "optimizer": parallel.full_optimizer_state(self.model, self.optimizer),
            "scheduler": self.scheduler.state_dict(),
            "streams": {n: s.state_dict() for n, s in self.streams.items()},
            "schedule": self.schedule.state_dict(),
            "generator": self.generator.get_state().cpu(),
            "skipped_steps": self.skipped_steps,
            "data_samples": self.data_samples,
            "world_size": self.dist.world_size,
            "config": yaml.safe_dump(self.cfg.model_dump(mode="json")),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        parallel.load_full_model_state(self.model, state["model"])
        parallel.load_full_model_state(self.ema, state["ema"])
        parallel.load_full_optimizer_state(self.model, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        missing = set(self.streams) - set(state["streams"])
        if missing:
            raise ConfigError(f"the checkpoint has no data position for {sorted(missing)}: the mixture changed")
        for name, stream in self.streams.items():
            stream.load_state_dict(state["streams"][name])
        self.schedule.load_state_dict(state["schedule"])
        self.generator.set_state(state["generator"].to(self.generator.get_state().device))
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.data_samples = int(state.get("data_samples", 0))

    def save(self) -> Path | None:
        state = self.state_dict()
        path, error = None, None
        if self.dist.is_main:
            try:
                path = save_checkpoint(state, self.ckpt_dir, self.step, self.cfg.train.keep_last)
            except CheckpointWriteError as e:  # e.g. a full disk: every rank must stop, not only rank 0
                error = str(e)
        error = broadcast_object(error)
        if error:
            raise CheckpointWriteError(error)
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
    def train_step(self, batches: list[Batch], name: str | None = None) -> dict[str, float]:
        """One optimizer step on modality ``name`` over ``len(batches)`` accumulation micro-batches;
        returns rank-mean values."""
        name = name or self.modality.name
        modality, objective = self.modalities[name], self.objectives[name]
        accum = len(batches)
        sums: dict[str, float] = {}  # loss, loss_fm, loss_rep (+ loss_fm_<group> under a token schedule)
        schedule = modality.token_schedule()
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16,
                                  enabled=self.cfg.train.precision == "bf16")
        # Every micro-step replays the same global draw and takes its slice: micro-batch i of rank r holds
        # global samples (i·W + r)·B …, exactly as the data stream lays them out. So (ranks × accumulation)
        # splits of one global batch train on identical numbers.
        rng_state = self.generator.get_state()
        world, rank = self.dist.world_size, self.dist.rank
        for i, batch in enumerate(batches):
            self.generator.set_state(rng_state)
            tokens, cond = modality.encode(batch, self.device)
            self.tokens_per_sample[name] = tokens.x.shape[1]
            with parallel.grad_sync(self.model, i == accum - 1), autocast:
                losses = self_flow_loss(self.model, self.ema if objective.uses_teacher else None, tokens,
                                        cond, objective, null_label=self.raw.null_label,
                                        modality=name, generator=self.generator,
                                        shard=(i * world + rank, accum * world), schedule=schedule,
                                        groups=modality.token_groups(tokens) if schedule else None)
                # Always backward, even on a non-finite loss: every rank must join the gradient reduction.
                (losses["loss"] / accum).backward()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) / accum
        grad_norm = torch.nn.utils.clip_grad_norm_(self.raw.parameters(), self.cfg.optim.grad_clip)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        # Corrupt samples the streams skipped (cumulative, this rank): summed over ranks in the same reduction.
        sums["data_skipped"] = float(sum(getattr(s, "skipped", 0) for s in self.streams.values()))
        out = all_mean(sums, self.device)
        out["data_skipped"] = round(out["data_skipped"] * self.dist.world_size)
        out["grad_norm"] = float(grad_norm)
        self.data_samples += self.global_batch(name)
        self._check_bad_data(out["data_skipped"])
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
        ema_update(self.ema, self.raw, self.cfg.ema.decay_at(self.step))
        return out

    def _check_bad_data(self, skipped: int) -> None:
        """Stop when more than ``train.max_bad_data_fraction`` of the samples read were corrupt (every rank
        sees the same reduced counts, so all stop together)."""
        seen = self.data_samples + skipped
        limit = self.cfg.train.max_bad_data_fraction
        if seen >= MIN_SAMPLES_FOR_BAD_FRACTION and skipped > limit * seen:
            last = latest_checkpoint(self.ckpt_dir)
            raise BadDataError(
                f"{skipped} of {seen} samples read so far were corrupt and skipped ({skipped / seen:.1%} > "
                f"train.max_bad_data_fraction={limit}) at step {self.step}; stopping. The warnings of "
                f"selfflow.shards name each bad shard and key; the last good checkpoint is {last or 'none'}.")

    # --- loop -------------------------------------------------------------------------------------
    def write_samples(self) -> Path | None:
        """Preview samples of every modality (a mixed run writes ``samples/<modality>/``); returns the
        first file written."""
        s = self.cfg.sample
        model = self.ema if s.use_ema else self.model
        if self.strategy != "fsdp2" and not self.dist.is_main:
            barrier()
            return None
        first = None
        for name, modality in self.modalities.items():
            media, labels = generate(model, modality, s.num_samples, s, s.seed, self.device)
            folder = self.sample_dir / name if self.mixed else self.sample_dir
            if self.dist.is_main:
                path = modality.save_samples(media, labels, folder / f"step_{self.step:08d}")
                first = first or path
        if self.strategy != "fsdp2":
            barrier()
        return first

    def evaluate(self) -> dict[str, float]:
        """Online evaluation: generate ``train.eval_samples`` with the EMA for each modality that has an
        evaluator (e.g. probe-FD on synthetic shapes) and score them. Keys are prefixed in mixed runs."""
        s = self.cfg.sample
        model = self.ema if s.use_ema else self.model
        evaluators = getattr(self, "_evaluators", None)
        if evaluators is None:
            evaluators = self._evaluators = {n: get_evaluator(m.evaluator)(m)
                                             for n, m in self.modalities.items() if m.evaluator}
        if not evaluators or (self.strategy != "fsdp2" and not self.dist.is_main):
            if evaluators:
                barrier()
            return {}
        out: dict[str, float] = {}
        for name, evaluator in evaluators.items():
            media, labels = generate(model, self.modalities[name], self.cfg.train.eval_samples, s, s.seed + 1,
                                     self.device)
            if self.dist.is_main:
                out.update({(f"{k}/{name}" if self.mixed else k): v for k, v in evaluator(media, labels).items()})
        if self.strategy != "fsdp2":
            barrier()
        return out

    def _throughput(self, seconds: float, steps: dict[str, int]) -> dict[str, float]:
        """Rates over the logging window, whose steps may span several modalities."""
        seconds = max(seconds, 1e-9)
        samples = sum(n * self.global_batch(m) for m, n in steps.items())
        tokens = sum(n * self.global_batch(m) * self.tokens_per_sample[m] for m, n in steps.items())
        out = {"samples_per_s": samples / seconds, "tokens_per_s": tokens / seconds}
        tc = self.cfg.train
        if tc.peak_tflops:
            flops = sum(n * self.global_batch(m) * train_step_flops(
                self.raw, self.tokens_per_sample[m], teacher_layer=(
                    self.objectives[m].teacher_layer if self.objectives[m].uses_teacher else None))
                for m, n in steps.items())
            out["mfu"] = flops / seconds / (tc.peak_tflops * 1e12 * self.dist.world_size)
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
        data = {n: iter(st) for n, st in self.streams.items()}
        bar = tqdm(total=tc.steps, initial=self.step, disable=not self.progress, dynamic_ncols=True,
                   desc=f"train {self.cfg.name}", unit="step")
        last: dict[str, float] = {}
        window_t, window_n = 0.0, dict.fromkeys(self.modalities, 0)
        try:
            while self.step < tc.steps:
                t0 = time.perf_counter()
                name = self.schedule.next()
                batches = faults.poison_batches([next(data[name]) for _ in range(tc.grad_accum_steps)],
                                                self.step + 1)
                last = self.train_step(batches, name)
                self.step += 1
                faults.kill_point(self.step, self.dist.rank, self.run_dir)
                window_t += time.perf_counter() - t0
                window_n[name] += 1
                bar.update(1)
                if self.step % tc.log_every == 0 or self.step == tc.steps:
                    record = {"step": self.step, "modality": name, **last, "lr": self.scheduler.get_last_lr()[0],
                              **self._throughput(window_t, {m: n for m, n in window_n.items() if n}),
                              "skipped_steps": self.skipped_steps}
                    if self.mixed:
                        record.update({f"steps/{m}": c for m, c in self.schedule.counts.items()})
                    window_t, window_n = 0.0, dict.fromkeys(self.modalities, 0)
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
