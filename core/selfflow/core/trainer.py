"""The training loop: Self-Flow (or a baseline) on one modality or a mixture — single process, DDP or FSDP2.

Everything random in a step (noise, timesteps, masks, label dropout) comes from one generator with the
same seed on every rank; each rank keeps its slice of the global draw (:class:`StepNoise`). In a mixed
run, the modality of each step comes from a seeded :class:`ModalitySchedule`, identical on every rank.
All of it is checkpointed with the model, EMA, optimizer, schedule and data positions, so a resumed run
— on the same or another number of ranks — continues with the numbers an uninterrupted run would have
produced.

The trainer builds the run (:func:`~selfflow.core.run_setup.build_run`) and its components — the
:class:`Checkpointer`, the :class:`TrainingLog`, the :class:`Previewer` and the :class:`StepGuard` — and
runs the optimizer steps; :meth:`Trainer.fit` is the loop that ties them together.
"""

from __future__ import annotations

import json
import logging
import signal
import warnings
from pathlib import Path
from typing import Any

import torch

from . import faults, parallel
from .atomic import atomic_write_text
from .checkpoint import checkpoint_path, latest_checkpoint
from .checkpointer import Checkpointer, GeneratorState, ModelState, OptimizerState, StreamsState
from .config import ConfigError, RunConfig, changed_settings
from .data.data_facts import FACTS_FILE, MODEL_FILES
from .data.pinning import batch_to_device, pin_batch, resolve_pin_memory
from .distributed import all_mean, init_distributed
from .ema import ema_update, make_ema
from .flops import train_step_flops
from .mixture import ModalitySchedule
from .modality import (
    Batch,
    check_first_batch,
    location_options,
    model_location_options,
    open_stream,
    options_record,
)
from .precision import warn_if_slow
from .pretrained import CONFIG_FILE
from .previewer import EvaluationInterrupted, Previewer
from .run_setup import (
    HYPERPARAMETERS,
    build_optimizer,
    build_run,
    freeze,
    init_from,
    pick_device,
    read_init_weights,
    reapply_hyperparameters,
    set_torch_globals,
)
from .step_guard import StepGuard
from .stop_request import StopRequest
from .training_log import StepCost, TrainingLog


class Trainer:
    """One training run of a :class:`~.config.RunConfig`: ``Trainer(cfg).fit()`` trains to ``train.steps`` in
    ``cfg.run_dir``, resuming from its newest intact checkpoint unless ``resume=False`` (``resplit_data``: also
    when its shard streams were split otherwise, from their next epoch: ``selfflow train --resplit-data``). Under
    ``torchrun`` each rank builds its own (DDP or FSDP2 by ``train.parallel``). ``selfflow train`` wraps :meth:`fit` in
    ``trainer.log.text_log()``, which also appends the console lines to ``<run_dir>/train.log``; from Python,
    do the same to keep that file::

        trainer = Trainer(load_config("configs/tiny/image.yaml", ["train.steps=50"]))
        with trainer.log.text_log():
            result = trainer.fit()  # {"checkpoint", "samples", "ema", "loss_plot", "eval_plot", "last": …}
    """

    def __init__(self, cfg: RunConfig, *, resume: bool = True, resplit_data: bool = False, progress: bool = True):
        self.cfg, self.run_dir = cfg, cfg.run_dir
        tc = cfg.train
        self.dist = init_distributed(pick_device(tc.device))
        self.device = self.dist.device
        set_torch_globals(tc, self.device)
        self.run = build_run(cfg)
        self.entries = {e.modality: e for e in cfg.data.entries()}
        try:
            self.strategy = parallel.resolve_strategy(tc.parallel, self.dist)
            self.pin_memory = resolve_pin_memory(cfg.data.pin_memory, self.device)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self._wrap_models(resume)
        self.optimizer, self.scheduler = build_optimizer(self.raw, cfg.optim, tc.steps)
        # Same seed on every rank: each rank slices its part of the global draw (StepNoise.draw).
        self.generator = torch.Generator(device=self.device).manual_seed(tc.seed * 1000 + 17)
        self.schedule = ModalitySchedule({n: e.weight for n, e in self.entries.items()}, tc.seed * 1000 + 29)
        self.streams = {n: open_stream(m, self.batch_size(n), tc.seed, self.dist.rank, self.dist.world_size)
                        for n, m in self.run.modalities.items()}
        self.step = 0
        self.eval_pending = False  # this step's evaluation was deferred by a stop: the resumed run does it first
        self.resumed_batches: tuple[int | None, dict[str, int] | None] = (None, None)  # ranks, global batches
        self.tokens_per_sample: dict[str, int] = {}
        self.context_per_sample: dict[str, int] = {}  # caption tokens (padded: all computed), for the FLOPs

        self.stop = StopRequest()  # a signal during fit(): finish the step, checkpoint, stop
        self._stop_agreed: signal.Signals | None = None  # the stop signal some rank had before this step's reduction
        self.guard = StepGuard(tc, self.run_dir / "checkpoints")
        self.log = TrainingLog(cfg, self.dist, self.device, progress=progress, step_cost=self._step_cost)
        self.previewer = Previewer(cfg, self.run.modalities, self.ema if cfg.sample.use_ema else self.model,
                                   self.dist, self.strategy, self.device, log=self.log)
        self.checkpointer = Checkpointer(cfg, self.dist, {
            "trainer": self, "model": ModelState(self.model), "ema": ModelState(self.ema),
            "optimizer": OptimizerState(self.model, self.optimizer), "scheduler": self.scheduler,
            "streams": StreamsState(self.streams, resplit=resplit_data), "schedule": self.schedule,
            "generator": GeneratorState(self.generator), "guard": self.guard},
            collective_state=self.strategy == "fsdp2",
            objectives={name: objective.settings() for name, objective in self.run.objectives.items()},
            data_options={name: options_record(m) for name, m in self.run.modalities.items()},
            data_locations={name: location_options(m) for name, m in self.run.modalities.items()},
            model_locations={name: model_location_options(m) for name, m in self.run.modalities.items()})
        if self.checkpointer.model_folders.files:  # recorded with the run and its export, checked when loaded
            self.run.data_facts[MODEL_FILES] = dict(self.checkpointer.model_folders.files)
        configured = [{k: g[k] for k in HYPERPARAMETERS} for g in self.optimizer.param_groups]
        with self.log.text_log():  # what the resume says (a broken checkpoint skipped) belongs in train.log
            if self.dist.is_main and (warning := self.previewer.idle_eval_warning()):
                logging.getLogger("selfflow").warning(warning)
            self.resumed_from = self.checkpointer.resume() if resume else None
            if not resume:
                self.checkpointer.set_aside()
            if self.resumed_from is not None:
                for change in reapply_hyperparameters(self.optimizer, self.scheduler, configured):
                    logging.getLogger("selfflow").info("resume: optim %s, as this run's config says", change)
                for change in changed_settings(self.checkpointer.resumed_config, cfg.model_dump(mode="json")):
                    logging.getLogger("selfflow").info("resume: %s, from step %d on", change, self.step)
                for change in self.global_batch_changes():
                    logging.getLogger("selfflow").warning("resume: %s", change)
            elif self.init_report is not None or cfg.train.freeze:
                self._log_fine_tuning()
        # What the modalities read from their data (loading the run needs no data then) — written once the
        # setup has succeeded, so that a start refused above leaves no half-made run directory behind.
        if self.dist.is_main:
            atomic_write_text(self.run_dir / FACTS_FILE, json.dumps(self.run.data_facts, indent=1) + "\n")

    def _log_fine_tuning(self) -> None:
        """What a fine-tuning start took from ``train.init_from`` and what ``train.freeze`` holds still."""
        log, tc = logging.getLogger("selfflow"), self.cfg.train

        def names(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f" … ({len(keys)} in all)" if len(keys) > 8 else "")

        if self.init_report is not None:
            fresh, ignored = self.init_report["fresh"], self.init_report["ignored"]
            loaded = len(self.raw.state_dict()) - len(fresh)
            log.info("init_from %s (%s weights of %s): %d tensors loaded; %d fresh (not in the source)%s; %d ignored "
                     "(not in this model)%s", tc.init_from, tc.init_weights, self.init_source, loaded, len(fresh),
                     f": {names(fresh)}" if fresh else "", len(ignored), f": {names(ignored)}" if ignored else "")
        if tc.freeze:
            log.info("train.freeze %s: %s parameter values frozen", list(tc.freeze), f"{self.frozen_params:,}")

    def _wrap_models(self, resume: bool) -> None:
        """The run's backbone on the device — fine-tuned from ``train.init_from`` on a fresh start, frozen where
        asked, compiled — as the student (DDP/FSDP2-wrapped: ``model``; unwrapped: ``raw``) and its EMA."""
        tc = self.cfg.train
        raw = self.run.backbone.to(self.device)
        raw.activation_checkpointing = tc.activation_checkpointing
        self.init_report: dict[str, list[str]] | None = None
        self.init_source: Path | None = None  # the file init_from's weights came from
        if tc.init_from and not (resume and latest_checkpoint(self.run_dir / "checkpoints")):
            try:
                weights, self.init_source = read_init_weights(tc.init_from, tc.init_weights)
                self.init_report = init_from(raw, weights)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        self.frozen_params = freeze(raw, tc.freeze)
        ema = make_ema(raw)
        if tc.compile:
            for block in [*raw.blocks(), *ema.blocks()]:
                block.compile()
        bf16 = tc.precision == "bf16"
        warn_if_slow(tc.precision, self.device)
        # A mixed step touches one modality's projections only: DDP must expect unused parameters.
        self.model = parallel.wrap_student(raw, self.strategy, self.dist, bf16,
                                           find_unused=self.run.mixed or bool(tc.freeze))
        self.ema = parallel.wrap_teacher(ema, self.strategy, bf16)
        self.raw = parallel.unwrap(self.model)

    def batch_size(self, name: str) -> int:
        """Per-rank micro-batch of a modality."""
        return self.entries[name].batch_size or self.cfg.train.batch_size

    def global_batch(self, name: str) -> int:
        return self.batch_size(name) * self.dist.world_size * self.cfg.train.grad_accum_steps

    def global_batch_changes(self) -> list[str]:
        """How a resume changes each modality's global batch: ``train.batch_size`` is per rank, so the "same
        command" on another number of ranks is another run (silently, until this said so)."""
        world_then, then = self.resumed_batches
        world, accum, out = self.dist.world_size, self.cfg.train.grad_accum_steps, []
        for name in self.entries:
            now = self.global_batch(name)
            if then is None or name not in then:  # a checkpoint before session 24 records the ranks only
                if world_then is not None and world_then != world:
                    out.append(f"{world_then} rank(s) then, {world} now: the batch size is per rank, so {name}'s "
                               f"global batch changed with them (now {now})")
                continue
            if (was := int(then[name])) != now:
                hint = f"; {was // (world * accum)} per rank keeps {was}" if was % (world * accum) == 0 else ""
                out.append(f"{name}'s global batch {was} → {now} ({world} rank(s) × {self.batch_size(name)} × "
                           f"{accum} accumulation step(s): the batch size is per rank{hint})")
        return out

    def _step_cost(self, name: str) -> StepCost:
        n, tokens = self.global_batch(name), self.tokens_per_sample[name]
        flops = 0.0
        if self.cfg.logging.peak_tflops:
            objective = self.run.objectives[name]
            flops = n * train_step_flops(self.raw, tokens, self.context_per_sample.get(name, 0),
                                         teacher_layer=objective.teacher_layer if objective.uses_teacher else None)
        return StepCost(n, n * tokens, flops)

    # The trainer's own part of a checkpoint (the components hold the rest).
    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "world_size": self.dist.world_size, "eval_pending": self.eval_pending,
                "log": self.log.state_dict(), "global_batch": {name: self.global_batch(name) for name in self.entries}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.resumed_batches = (state.get("world_size"), state.get("global_batch"))  # the latter since session 24
        self.eval_pending = bool(state.get("eval_pending", False))  # absent from checkpoints before session 17
        self.log.load_state_dict(state.get("log", {}))  # absent before session 22

    # --- one optimizer step -----------------------------------------------------------------------
    def train_step(self, batches: list[Batch], name: str) -> dict[str, float]:
        """One optimizer step on modality ``name`` over ``len(batches)`` accumulation micro-batches;
        returns rank-mean values."""
        modality, objective = self.run.modalities[name], self.run.objectives[name]
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
            # The batch moves here, for every modality (asynchronously when pinned); encode's own .to keep it.
            tokens, cond = modality.encode(batch_to_device(batch, self.device), self.device)
            if name not in self.tokens_per_sample:  # this session's first batch: one device sync, not one a step
                check_first_batch(modality, tokens, cond)
            self.tokens_per_sample[name] = tokens.x.shape[1]
            self.context_per_sample[name] = 0 if cond.context is None else cond.context.shape[1]
            with parallel.grad_sync(self.model, i == accum - 1), autocast:
                losses = objective.loss(self.model, self.ema if objective.uses_teacher else None, tokens,
                                        cond, null_label=self.raw.null_label,
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
        # A stop signal on any rank rides along in the same reduction: every rank stops after the same step.
        out = all_mean({**sums, **self.stop.for_reduction()}, self.device)
        self._stop_agreed = StopRequest.agreed_in(out)
        out["data_skipped"] = round(out["data_skipped"] * self.dist.world_size)
        out["grad_norm"] = float(grad_norm)
        out["lr"] = self.optimizer.param_groups[0]["lr"]  # what this step applies (the scheduler steps after it)
        # the guard's messages name this step as metrics.jsonl and the checkpoints do: counted from 1
        self.guard.check_data(self.global_batch(name), out["data_skipped"], self.step + 1)
        if not self.guard.accept(out["loss"], out["grad_norm"], self.step + 1):
            self.optimizer.zero_grad(set_to_none=True)
            self._advance_schedule()
            return {**out, "skipped": 1.0}
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._advance_schedule()
        ema_update(self.ema, self.raw, self.cfg.ema.decay_at(self.step))
        return out

    def _advance_schedule(self) -> None:
        """The LR schedule is a function of the step count, and a skipped step still counts toward
        ``train.steps``: the schedule moves on with it, or every later step would train at an earlier step's
        rate and the run would end before its decay did."""
        if self.scheduler._step_count > 1:  # past the first step: torch has nothing to warn about
            self.scheduler.step()
            return
        # torch warns when a run's very first step is skipped (no optimizer.step yet); that is intended here.
        # Only then: catch_warnings resets Python's once-per-place filter, so around every step it let other
        # warnings repeat at each step.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
            self.scheduler.step()

    @property
    def finished(self) -> bool:
        """The resumed run already reached ``train.steps`` and wrote every final output after its final checkpoint
        (the EMA export and its ``pretrained/`` folder, the loss plot): a rerun has nothing to do. A run killed
        among them is not finished: its rerun trains no step and writes them."""
        if self.resumed_from is None or self.step < self.cfg.train.steps:
            return False
        since = self.resumed_from.stat().st_mtime
        outputs = [self.run_dir / "ema.safetensors", self.run_dir / "pretrained" / CONFIG_FILE,
                   self.run_dir / "loss.png"]
        return all(p.is_file() and p.stat().st_mtime >= since for p in outputs)

    # --- loop -------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train to ``train.steps``, then write the final checkpoint, preview, EMA export and loss plot. A run
        that had already finished is left as it is (``samples`` and ``last`` are then empty). ``samples``: the
        (first) preview file; ``previews``: every modality's.

        ``SIGTERM``, ``SIGUSR1`` or Ctrl-C (in the main thread) stop the run after the step in progress: a
        checkpoint of that step is written and :class:`~.faults.RunInterrupted` raised; fitting again resumes
        there with the numbers of an uninterrupted run (:mod:`~selfflow.core.stop_request`). The step's online
        evaluation, if due, is left to the resumed run (``eval_pending``), which does it first."""
        if self.finished:
            return {"checkpoint": self.resumed_from, "samples": None, "previews": [],
                    "ema": self.run_dir / "ema.safetensors", "loss_plot": self._file("loss.png"),
                    "eval_plot": self._file("eval.png"), "last": {}}
        total, accum = self.cfg.train.steps, self.cfg.train.grad_accum_steps
        self.log.open(self.step)
        with self.stop.installed():
            try:
                last = self._train_to(total, accum)
            finally:
                self.log.close()
            # a signal from here on lets the run finish: its final outputs take a moment, not a step
            checkpoint, previews = self.checkpointer.save(self.step), self.previewer.write_samples(self.step)
            return {"checkpoint": checkpoint, "samples": previews[0] if previews else None, "previews": previews,
                    "ema": self.checkpointer.export_ema(self.ema, self.run.model_config,
                                                       data_facts=self.run.data_facts),
                    "loss_plot": self.log.finish(), "eval_plot": self._file("eval.png"), "last": last}

    def _file(self, name: str) -> Path | None:
        """``run_dir / name`` if this run has written it (rank 0), else ``None``."""
        path = self.run_dir / name
        return path if path.is_file() else None

    def _train_to(self, total: int, accum: int) -> dict[str, float]:
        """The steps up to ``total``, with the previews, evaluations and checkpoints due among them; returns the
        last step's values. A stop signal ends it after the step in progress (:meth:`_stop_here`)."""
        data = {n: iter(s) for n, s in self.streams.items()}
        last: dict[str, float] = {}
        if self.eval_pending:  # a stop deferred the resumed step's evaluation: it comes first
            self._evaluate()
            if self.eval_pending:  # stopped again, during it: the checkpoint of this step already says so
                self._stop_here(total, self._stop_signal() or signal.SIGTERM, saved=True)
        while self.step < total:
            self.log.step_started()
            name = self.schedule.next()
            batches = faults.poison_batches([next(data[name]) for _ in range(accum)], self.step + 1)
            if self.pin_memory:
                batches = [pin_batch(b) for b in batches]
            last = self.train_step(batches, name)
            self.step += 1
            faults.kill_point(self.step, self.dist.rank, self.run_dir)
            self.log.step_done(self.step, name, last, self._counters())
            preview, evaluation = self.previewer.samples_due(self.step), self.previewer.eval_due(self.step)
            asked, saved = self._stop_signal(), False
            # A stop already asked for defers the step's evaluation to the resumed run (the checkpoint says so):
            # a long evaluation could outlast the grace before the kill.
            self.eval_pending = evaluation and asked is not None
            if self.eval_pending:
                self._say_pending()
            # The checkpoint before the preview when a stop is asked (for the same reason), or when one is due and
            # no evaluation follows (a preview that fails, say a plug-in's writer, then loses no steps); with an
            # evaluation due it comes after that, so that it records the evaluation done.
            if preview and (asked is not None or (not evaluation and self.checkpointer.due(self.step, total))):
                self.checkpointer.save(self.step)
                saved = True
            if preview:
                self.previewer.write_samples(self.step)
            if evaluation and not self.eval_pending:
                self._evaluate()  # a stop during it defers it too
            if not saved and self.checkpointer.due(self.step, total):
                self.checkpointer.save(self.step)
                saved = True
            # Then the stop, so that the step's preview is not lost; a signal that came during the preview, the
            # evaluation or the checkpoint stops the run here too, not a step later.
            sig = asked or self._stop_signal(again=preview or evaluation or saved)
            if sig is not None:
                self._stop_here(total, sig, saved)
        return last

    def _evaluate(self) -> None:
        """This step's online evaluation, logged. A stop signal during it (asked before each batch of samples)
        abandons it and leaves it to the resumed run: ``eval_pending``, kept in the checkpoint."""
        try:
            scores = self.previewer.evaluate(interrupted=lambda: self._stop_signal(again=True) is not None)
        except EvaluationInterrupted:
            self.eval_pending = True
            self._say_pending()
            return
        self.eval_pending = False
        self.log.scores(self.step, scores)

    def _say_pending(self) -> None:
        if self.dist.is_main:
            logging.getLogger("selfflow").warning("selfflow: a stop came before the evaluation of step %d ended: "
                                                  "the resumed run does it first", self.step)

    def _stop_signal(self, again: bool = False) -> signal.Signals | None:
        """The signal to stop for after this step (``None``: go on). One process reads its flag; several ranks
        go by the step's reduction, where they agree — or, ``again``, by a new one that every rank joins (after
        a preview, evaluation or checkpoint: they take long enough for a signal to arrive meanwhile)."""
        if not self.dist.enabled:
            return self.stop.signal
        if again:
            self._stop_agreed = StopRequest.agreed_in(all_mean(self.stop.for_reduction(), self.device))
        return self._stop_agreed

    def _stop_here(self, total: int, sig: signal.Signals, saved: bool) -> None:
        """A stop signal reached this rank or another: write this step's checkpoint (a collective; unless the
        periodic one just did) and raise :class:`~.faults.RunInterrupted` on every rank — rank 0's says what was
        kept and how to go on."""
        path = checkpoint_path(self.checkpointer.dir, self.step) if saved else self.checkpointer.save(self.step)
        where = "" if self.stop.requested else " (on another rank)"
        raise faults.RunInterrupted(
            f"{sig.name}{where} at step {self.step} of {total}: wrote {path}; run the same command to resume "
            "from it" if self.dist.is_main else "", int(sig))

    def _counters(self) -> dict[str, int]:
        """Run-level counts logged with each record: skipped steps and, in a mixed run, steps per modality."""
        out = {"skipped_steps": self.guard.skipped_steps}
        if self.run.mixed:
            out.update({f"steps/{m}": c for m, c in self.schedule.counts.items()})
        return out

