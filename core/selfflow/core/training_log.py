"""The training log: what a run reports while it trains (section ``logging`` of the config).

Rank 0 writes step records to ``metrics.jsonl`` and TensorBoard (:class:`~selfflow.core.metrics.MetricsLogger`),
optionally to Weights & Biases, draws ``loss.png`` and shows a tqdm bar. Each record carries the rates of its
logging window — samples/s, tokens/s, MFU (with ``logging.peak_tflops``) and peak GPU memory — whose steps
may span several modalities. In a mixed run the per-step values are plotted per modality (``loss/image``,
``grad_norm/audio`` …). Preview samples go to TensorBoard and W&B as images, audio and videos.

The console lines of a run (the ``selfflow`` logger) are also appended to ``<run_dir>/train.log``
(:meth:`TrainingLog.text_log`). A W&B run's id is kept in ``<run_dir>/wandb_run_id``, so a resumed training
continues the same W&B run.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
from tqdm import tqdm

from .atomic import atomic_write_text
from .config import RunConfig, save_config
from .distributed import DistInfo
from .faults import RunInterrupted
from .metrics import MetricsLogger, plot_losses, plot_scores, scalar_values

logger = logging.getLogger("selfflow")
# Values of the step's own modality (loss, loss_fm, loss_rep, loss_fm_<group> …, grad_norm, skipped); in a
# mixed run their plots are split per modality. Run-level counts (skipped_steps, steps/<m>) are not.
_PER_MODALITY = ("grad_norm", "skipped")


class StepCost(NamedTuple):
    """What one optimizer step of a modality processes, over all ranks."""

    samples: int
    tokens: int
    flops: float  # analytic training FLOPs (0 when MFU is not reported)


class TrainingLog:
    """Opened by :meth:`open` at the start of ``fit`` and closed by :meth:`close`; ``step_cost(modality)``
    gives the :class:`StepCost` of one step of that modality (called at logging time)."""

    def __init__(self, cfg: RunConfig, dist: DistInfo, device: torch.device, *, progress: bool,
                 step_cost: Callable[[str], StepCost]):
        self.cfg = cfg
        self.log_cfg = cfg.logging
        self.dist = dist
        self.device = device
        # A bar only on a terminal: piped into a file (tee, a batch job) it is a line of carriage returns, and the
        # run logs a line per logging step instead
        self.progress = progress and dist.is_main and sys.stderr.isatty()
        self.step_cost = step_cost
        self.run_dir = cfg.run_dir
        self._metrics: MetricsLogger | None = None
        self._wandb: Any = None
        self._bar: tqdm | None = None
        self._mixed = len(cfg.data.entries()) > 1
        self._window_s = 0.0
        self._window_steps: dict[str, int] = {}
        self._window_peak = 0  # bytes: the largest CUDA peak of the window's training steps
        # A mixed run's other modalities in the logging window: their last step and values, logged with the
        # window's record (else a modality whose steps never land on a logging step would never be logged)
        self._window_last: dict[str, tuple[int, dict[str, float]]] = {}
        self._t0 = 0.0

    @contextlib.contextmanager
    def text_log(self) -> Iterator[None]:
        """While active, on rank 0: the ``selfflow`` logger's INFO lines (and its packages' warnings) go to the
        console — above the progress bar — and are appended to ``<run_dir>/train.log`` with a timestamp, as
        is the error that ends the block, if one does."""
        if not self.dist.is_main:
            yield
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(self.run_dir / "train.log", mode="a", encoding="utf-8")
        file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        handlers = (file, _ConsoleHandler())
        level = logger.level
        logger.setLevel(logging.INFO)
        for h in handlers:
            logger.addHandler(h)
        try:
            yield
        except BaseException as e:  # the reason a run ended early belongs in its log (the CLI prints it too)
            if isinstance(e, RunInterrupted):  # asked for (a signal), not a failure
                severity, text = logging.WARNING, f"stopped: {e}"
            else:
                severity, text = logging.ERROR, f"stopped: {type(e).__name__}: {e}"
            file.emit(logger.makeRecord(logger.name, severity, __file__, 0, text, None, None))
            raise
        finally:
            for h in handlers:
                logger.removeHandler(h)
                h.close()
            logger.setLevel(level)

    def open(self, step: int) -> None:
        """Write ``config.yaml`` and start the sinks, resuming at ``step`` (records after it are dropped)."""
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.run_dir / "config.yaml")
            self._metrics = MetricsLogger(self.run_dir, resume_step=step, tensorboard=self.log_cfg.tensorboard)
            self._wandb = self._open_wandb()
        self._bar = tqdm(total=self.cfg.train.steps, initial=step, disable=not self.progress, dynamic_ncols=True,
                         desc=f"train {self.cfg.name}", unit="step")

    def _open_wandb(self) -> Any:
        if not self.log_cfg.wandb:
            return None
        try:
            import wandb
        except ImportError:
            logger.warning("logging.wandb is on but wandb is not installed; logging to metrics.jsonl/TensorBoard "
                           "only")
            return None
        # The id is stored before the run starts, so a resumed training (even after a kill) continues it.
        id_file = self.run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else ""
        if not run_id:
            run_id = secrets.token_hex(4)
            atomic_write_text(id_file, run_id + "\n")
        return wandb.init(project=self.log_cfg.wandb_project, name=self.cfg.name, id=run_id, resume="allow",
                          dir=str(self.run_dir), config=self.cfg.model_dump(mode="json"))

    def step_started(self) -> None:
        if self.device.type == "cuda":  # each step's own peak: not a preview's or evaluation's before it
            torch.cuda.reset_peak_memory_stats(self.device)
        self._t0 = time.perf_counter()

    def step_done(self, step: int, modality: str, values: dict[str, float], extra: dict[str, Any]) -> None:
        """Count the step in the window; on a logging step (``logging.every``, and the last step) write
        ``{step, modality, **values, **rates, **extra}`` — in a mixed run preceded by ``{step, modality, **values}``
        of each other modality's last step in the window; draw the plot every ``logging.plot_every`` steps."""
        self._window_s += time.perf_counter() - self._t0
        self._window_steps[modality] = self._window_steps.get(modality, 0) + 1
        if self.device.type == "cuda":
            self._window_peak = max(self._window_peak, torch.cuda.max_memory_allocated(self.device))
        self._bar.update(1)
        if step % self.log_cfg.every == 0 or step == self.cfg.train.steps:
            for other, (at, last) in sorted(self._window_last.items(), key=lambda item: item[1][0]):
                if other != modality:
                    self._write({"step": at, "modality": other, **last}, self._tags(last, other))
            rates = self._rates()
            record = {"step": step, "modality": modality, **values, **rates, **extra}
            self._window_s, self._window_steps, self._window_last, self._window_peak = 0.0, {}, {}, 0
            self._write(record, self._tags(record, modality))
            self._bar.set_postfix(loss=f"{values['loss']:.4f}", rep=f"{values['loss_rep']:.3f}",
                                  sps=f"{rates['samples_per_s']:.0f}", tps=f"{rates['tokens_per_s']:.0f}")
            if not self.progress and self.dist.is_main:  # no bar (a batch job's log): a line instead
                logger.info(f"step {step}/{self.cfg.train.steps}{f' ({modality})' if self._mixed else ''}: "
                            f"loss {values['loss']:.4f}, rep {values['loss_rep']:.3f}, "
                            f"{rates['samples_per_s']:.1f} samples/s")
        elif self._mixed:
            self._window_last[modality] = (step, dict(values))
        if self._metrics is not None and self.log_cfg.plot_every and step % self.log_cfg.plot_every == 0:
            plot_losses(self._metrics.path, self.run_dir / "loss.png")

    def state_dict(self) -> dict[str, Any]:
        """The logging window's pending per-modality values (a mixed run's), so that a resumed run logs the records
        an uninterrupted one does."""
        return {"window_last": {m: {"step": at, "values": v} for m, (at, v) in self._window_last.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._window_last = {m: (int(e["step"]), dict(e["values"])) for m, e in state.get("window_last", {}).items()}

    def scores(self, step: int, scores: dict[str, float]) -> None:
        """Online-evaluation scores: to ``metrics.jsonl``, the console and ``eval.png`` (rank 0)."""
        if self._metrics is not None and scores:
            record = {"step": step, **scores}
            self._write(record, scalar_values(record))
            logger.info(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in scores.items()))
            plot_scores(self._metrics.path, self.run_dir / "eval.png")

    def media(self, step: int, modality: str, path: Path) -> None:
        """A preview file written at ``step`` (PNG, WAV, MP4): to TensorBoard and W&B (rank 0), tagged
        ``samples/<modality>``."""
        if self._metrics is None:
            return
        tag = f"samples/{modality}"
        self._metrics.log_media(step, tag, path)
        if self._wandb is not None:
            import wandb

            kind = {".png": wandb.Image, ".wav": wandb.Audio, ".mp4": wandb.Video, ".gif": wandb.Video}
            if path.suffix in kind:
                self._wandb.log({tag: kind[path.suffix](str(path))}, step=step)

    def _tags(self, record: dict[str, Any], modality: str) -> dict[str, float]:
        """The plotted scalars of a step record: in a mixed run, per-step values get a ``/<modality>`` tag."""
        values = scalar_values(record)
        if not self._mixed:
            return values
        return {(f"{k}/{modality}" if k.startswith("loss") or k in _PER_MODALITY else k): v
                for k, v in values.items()}

    def _write(self, record: dict[str, Any], scalars: dict[str, float]) -> None:
        if self._metrics is not None:
            self._metrics.log(record, scalars)
        if self._wandb is not None:
            self._wandb.log(scalars, step=record["step"])

    def _rates(self) -> dict[str, float]:
        seconds = max(self._window_s, 1e-9)
        costs = {m: (n, self.step_cost(m)) for m, n in self._window_steps.items()}
        out = {"samples_per_s": sum(n * c.samples for n, c in costs.values()) / seconds,
               "tokens_per_s": sum(n * c.tokens for n, c in costs.values()) / seconds}
        if self.log_cfg.peak_tflops:
            flops = sum(n * c.flops for n, c in costs.values())
            out["mfu"] = flops / seconds / (self.log_cfg.peak_tflops * 1e12 * self.dist.world_size)
        if self.device.type == "cuda":
            out["gpu_mem_gb"] = self._window_peak / 2**30
        return out

    def close(self) -> None:
        """Close the bar and the metrics file (W&B stays open for :meth:`finish`)."""
        if self._bar is not None:
            self._bar.close()
        if self._metrics is not None:
            self._metrics.close()

    def finish(self) -> Path | None:
        """After a completed run: the final loss plot (rank 0) and the end of the W&B run."""
        plot = plot_losses(self._metrics.path, self.run_dir / "loss.png") if self._metrics is not None else None
        if self._wandb is not None:
            self._wandb.finish()
        return plot


class _ConsoleHandler(logging.Handler):
    """Console output through ``tqdm.write``, so log lines print above a running progress bar (INFO to
    stdout, warnings and errors to stderr)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stdout if record.levelno < logging.WARNING else sys.stderr)
        except Exception:
            self.handleError(record)
