"""Shared pieces of the fault-injection suite: the result record of one fault, and launching ``selfflow``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# A tiny MMDiT on 16×16 synthetic shapes: a step takes a few milliseconds, so kill/resume cycles are cheap.
TINY_MODEL = ["model.hidden_size=32", "model.num_heads=2", "model.depth_double=1", "model.depth_single=2",
              "model.axes_dim=[4,6,6]", "sample.steps=2", "sample.num_samples=10", "ema.decay=0.9",
              "optim.warmup_steps=2", "logging.every=1", "logging.plot_every=1000", "train.num_threads=1"]
TINY_IMAGE = ["data.options.image_size=16", "data.options.patch_size=4"]


@dataclass
class Outcome:
    """One row of docs/RELIABILITY.md: a fault, how often it was injected and what happened."""

    family: str
    fault: str
    expected: str
    trials: int = 0
    passed: int = 0
    crashes: int = 0
    data_lost: int = 0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)
    note: str = ""

    def record(self, ok: bool, *, crash: bool = False, lost: int = 0, why: str = "") -> None:
        self.trials += 1
        self.passed += int(ok)
        self.crashes += int(crash)
        self.data_lost += lost
        if not ok and why:
            self.failures.append(why)

    @property
    def ok(self) -> bool:
        return self.trials > 0 and self.passed == self.trials and not self.crashes and not self.data_lost


class Timer:
    def __init__(self, outcome: Outcome):
        self.outcome = outcome

    def __enter__(self) -> Timer:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.outcome.seconds += time.perf_counter() - self.t0


def env(**extra: str) -> dict[str, str]:
    """The environment of a child process: one thread, offline, no inherited fault hooks."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("SELFFLOW_FAULT_")}
    return {**base, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **extra}


def train_cmd(out: Path, name: str, *sets: str, nproc: int = 1, max_restarts: int = 0,
              image: bool = True) -> list[str]:
    """``selfflow train`` on the tiny model (plain process, or torchrun with ``nproc`` gloo ranks); by
    default on 16×16 synthetic shapes."""
    tiny = [*TINY_MODEL, *(TINY_IMAGE if image else [])]
    args = [a for s in [*tiny, f"output_dir={out}", f"name={name}", *sets] for a in ("--set", s)]
    if nproc == 1:
        return [sys.executable, "-m", "selfflow.core.cli", "train", "--no-progress", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            f"--max-restarts={max_restarts}", "-m", "selfflow.core.cli", "train", "--no-progress", *args]


def _live_sigint() -> None:
    # A suite started as a background job of a non-interactive shell passes SIGINT on ignored, and the trainer
    # rightly leaves an ignored SIGINT alone: the SIGINT faults would vanish. The child gets the default.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run(cmd: list[str], timeout: float = 600, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env(**extra_env), cwd=ROOT,
                          preexec_fn=_live_sigint)


def losses(records: list[dict[str, Any]]) -> list[tuple[int, float, float, float]]:
    """The per-step numbers a resumed run must reproduce exactly."""
    return [(r["step"], r["loss"], r["loss_fm"], r["grad_norm"]) for r in records if "loss" in r]


def lost_steps(reference: list[tuple], got: list[tuple]) -> int:
    """Steps of the reference run that the faulted run is missing or reproduced with other numbers."""
    mine = {r[0]: r for r in got}
    return sum(1 for r in reference if mine.get(r[0]) != r) + max(0, len(got) - len(reference))
