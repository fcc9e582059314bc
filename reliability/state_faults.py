"""Run-state faults of issue #16: history (item 2), non-finite weights (4), a read-only disk (5) and
broken newest checkpoints (6), each through ``selfflow train`` on the tiny model.

A base run is killed after step 16 (checkpoints 5, 10 and 15 on disk); each case copies it, injects one
fault and runs the same command again. Expected: the run resumes — from the newest *intact* checkpoint,
naming the broken one on stderr and in ``train.log`` — and its ``metrics.jsonl`` equals an uninterrupted
reference run's exactly; or, for the read-only disk, it stops with exit 3 naming the intact checkpoint,
without a traceback.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from .common import ROOT, Outcome, Timer, losses, lost_steps, run, train_cmd

STEPS, EVERY, KILL = 20, 5, 16
SETS = (f"train.steps={STEPS}", f"checkpoint.every={EVERY}", "checkpoint.keep_last=3", "train.batch_size=2",
        "sample.every=0")
NEWEST = f"step_{15:08d}.pt"


def _poison(part: str) -> Callable[[Path], None]:
    """NaN into the first floating tensor of the checkpoint's ``part`` (model / ema) state."""
    def edit(path: Path) -> None:
        state = torch.load(path, weights_only=True)

        def first_float(node: object) -> torch.Tensor | None:
            if isinstance(node, torch.Tensor):
                return node if node.is_floating_point() else None
            values = node.values() if isinstance(node, dict) else node if isinstance(node, list | tuple) else []
            return next((t for t in map(first_float, values) if t is not None), None)

        tensor = first_float(state[part])
        if tensor is None:
            raise KeyError(f"no floating tensor under {part!r} in {path}")
        tensor.view(-1)[0] = float("nan")
        torch.save(state, path)
    return edit


def _directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


BROKEN_NEWEST: dict[str, tuple[str, Callable[[Path], None]]] = {
    "truncated": ("6", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])),
    "zero-byte": ("6", lambda p: p.write_bytes(b"")),
    "a directory": ("6", _directory),
    "NaN in the model": ("4", _poison("model")),
    "NaN in the EMA": ("4", _poison("ema")),
}

# Kill the process while metrics.jsonl is rewritten on resume: after the new content is written and
# before the rename (the atomic writer's only window).
_KILL_IN_REWRITE = """
import os, signal, sys
import selfflow.core.atomic as atomic
from selfflow.core.metrics import MetricsLogger
atomic.os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
MetricsLogger(sys.argv[1], resume_step=10, tensorboard=False)
"""

# A read-only disk from step 10 on: the checkpoint write and its cleanup both fail with EROFS.
_READ_ONLY = """
import errno, os, pathlib, sys
import selfflow.core.checkpoint as ckpt
from selfflow.core.cli import main
def erofs(*a, **k):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS))
real_open, real_unlink = open, pathlib.Path.unlink
ckpt.open = lambda p, *a, **k: erofs() if str(p).endswith("step_00000010.pt.tmp") else real_open(p, *a, **k)
pathlib.Path.unlink = lambda self, *a, **k: erofs() if self.name.endswith(".tmp") else real_unlink(self, *a, **k)
sys.exit(main(sys.argv[1:]))
"""


def _copy(work: Path, base: str, name: str) -> Path:
    shutil.rmtree(work / name, ignore_errors=True)
    shutil.copytree(work / base, work / name)
    return work / name


def _resumed(work: Path, name: str, reference: list[tuple], outcome: Outcome, *, must_name: str = "") -> None:
    from selfflow.core.metrics import read_metrics

    text_log = work / name / "train.log"
    before = text_log.stat().st_size if text_log.is_file() else 0
    with Timer(outcome):
        proc = run(train_cmd(work, name, *SETS))
    got = losses(read_metrics(work / name / "metrics.jsonl")) if (work / name / "metrics.jsonl").is_file() else []
    lost = lost_steps(reference, got)
    logged = text_log.read_bytes()[before:].decode() if text_log.is_file() else ""  # this run's lines
    ok = proc.returncode == 0 and not lost and must_name in proc.stderr and must_name in logged
    outcome.record(ok, crash="Traceback" in proc.stderr, lost=lost,
                   why=f"{name}: exit {proc.returncode}, {lost} steps lost: {proc.stderr[-600:]}")


def run_all(work: Path | None = None) -> list[Outcome]:
    from selfflow.core.metrics import read_metrics

    work = Path(work or ROOT / "runs" / "reliability" / "state")
    work.mkdir(parents=True, exist_ok=True)
    for name in ("reference", "base"):
        shutil.rmtree(work / name, ignore_errors=True)
    proc = run(train_cmd(work, "reference", *SETS))
    if proc.returncode:
        raise RuntimeError(f"reference run failed: {proc.stderr[-2000:]}")
    reference = losses(read_metrics(work / "reference" / "metrics.jsonl"))
    proc = run(train_cmd(work, "base", *SETS), SELFFLOW_FAULT_KILL_AT=str(KILL))
    if not (work / "base" / "checkpoints" / NEWEST).is_file():
        raise RuntimeError(f"base run left no {NEWEST}: exit {proc.returncode} {proc.stderr[-2000:]}")

    outs = []
    for kind, (item, damage) in BROKEN_NEWEST.items():
        out = Outcome("process", f"newest checkpoint {kind} (item {item})",
                      "resumes from the older intact one, naming the broken one; losses equal the reference")
        run_dir = _copy(work, "base", f"broken-{kind.replace(' ', '-')}")
        damage(run_dir / "checkpoints" / NEWEST)
        _resumed(work, run_dir.name, reference, out, must_name=NEWEST)
        out.note = f"{NEWEST} named (stderr and train.log); resumed from step_{10:08d}.pt"
        outs.append(out)

    torn = Outcome("process", "torn last line in metrics.jsonl (item 2)", "resumes; losses equal the reference")
    run_dir = _copy(work, "base", "torn-metrics")
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 17, "loss": 0.12')
    _resumed(work, run_dir.name, reference, torn)
    outs.append(torn)

    rewrite = Outcome("process", "SIGKILL during the metrics.jsonl rewrite on resume (item 2)",
                      "metrics.jsonl intact (not emptied); the next resume equals the reference")
    run_dir = _copy(work, "base", "killed-rewrite")
    before = (run_dir / "metrics.jsonl").read_bytes()
    with Timer(rewrite):
        kill = run([sys.executable, "-c", _KILL_IN_REWRITE, str(run_dir)])
    intact = (run_dir / "metrics.jsonl").read_bytes() == before and kill.returncode == -9
    if not intact:
        rewrite.record(False, lost=1, why=f"exit {kill.returncode}, metrics.jsonl changed to "
                                          f"{(run_dir / 'metrics.jsonl').stat().st_size} bytes: {kill.stderr[-400:]}")
    _resumed(work, run_dir.name, reference, rewrite)
    outs.append(rewrite)

    erofs = Outcome("process", "read-only disk at a checkpoint write (item 5)",
                    "stops: exit 3 naming the intact checkpoint, no traceback")
    run_dir = _copy(work, "base", "read-only")
    shutil.rmtree(run_dir / "checkpoints")  # restart from 5: the failing write is step 10's
    shutil.copytree(work / "base" / "checkpoints", run_dir / "checkpoints",
                    ignore=lambda d, names: [n for n in names if n != f"step_{5:08d}.pt"])
    with Timer(erofs):
        proc = run([sys.executable, "-c", _READ_ONLY, *train_cmd(work, run_dir.name, *SETS)[3:]])
    ok = proc.returncode == 3 and f"step_{5:08d}.pt" in proc.stderr and "Traceback" not in proc.stderr
    erofs.record(ok, crash="Traceback" in proc.stderr, why=f"exit {proc.returncode}: {proc.stderr[-600:]}")
    outs.append(erofs)
    return outs
