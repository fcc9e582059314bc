"""Process faults: SIGKILL at random moments, a full disk during a save, kills while sampling.

A faulted training run is killed many times — at a random moment between steps (which may fall in a
sample grid or a checkpoint) or while a checkpoint is half written (``SELFFLOW_FAULT_SAVE_DELAY`` holds the
``.tmp`` open) — and restarted with the same command each time. Every restart must resume from the newest
complete checkpoint that existed at the kill, never from a partial file, and the finished run's
``metrics.jsonl`` must equal an uninterrupted reference run's exactly (step, loss, loss_fm, grad_norm):
"data lost" counts the steps that differ or are missing. A full disk (``SELFFLOW_FAULT_SAVE_ENOSPC``)
must stop the run with a clear error and leave the previous checkpoint loadable. ``selfflow sample
--out-dir`` killed mid-generation must complete to the same ``.npz`` as an uninterrupted call.
"""

from __future__ import annotations

import random
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np

from .common import ROOT, Outcome, Timer, env, losses, lost_steps, run, train_cmd

STEPS, EVERY = 30, 3
SETS = (f"train.steps={STEPS}", f"checkpoint.every={EVERY}", "train.batch_size=2",
        "sample.every=7", "checkpoint.keep_last=2")


def _complete(ckpts: Path) -> list[int]:
    from selfflow.core.checkpoint import list_checkpoints

    return [s for s, _ in list_checkpoints(ckpts)]


def _written_since(path: Path, since: float) -> bool:
    """``path`` exists and was written by a process started at ``since`` (a stale .tmp does not count)."""
    try:
        return path.stat().st_mtime >= since
    except FileNotFoundError:
        return False


def _last_logged(metrics: Path, since: float) -> int:
    """The last step logged by a process started at ``since`` (older records may be truncated on resume)."""
    try:
        if metrics.stat().st_mtime < since:
            return 0
        lines = metrics.read_text().splitlines()
        return int(re.search(r'"step": (\d+)', lines[-1]).group(1)) if lines else 0
    except (FileNotFoundError, AttributeError):
        return 0


def _reference(work: Path, seed: int) -> list[tuple]:
    from selfflow.core.metrics import read_metrics

    shutil.rmtree(work / f"ref{seed}", ignore_errors=True)
    proc = run(train_cmd(work, f"ref{seed}", *SETS, f"train.seed={seed}"))
    if proc.returncode:
        raise RuntimeError(f"reference run failed: {proc.stderr[-2000:]}")
    return losses(read_metrics(work / f"ref{seed}" / "metrics.jsonl"))


def killed_runs(work: Path, kills_per_run: int = 12, seeds: tuple[int, ...] = (0, 1)) -> list[Outcome]:
    """Kill a run ``kills_per_run`` times (alternating mid-step / mid-write), then let it finish."""
    from selfflow.core.metrics import read_metrics

    mid_step = Outcome("process", "SIGKILL at a random moment of training",
                       "resumes from the newest complete checkpoint; losses equal the reference")
    mid_write = Outcome("process", "SIGKILL while a checkpoint is half written",
                        "the .tmp is never loaded; resumes from the previous checkpoint")
    rng = random.Random(1234)
    for seed in seeds:
        ref = _reference(work, seed)
        name = f"killed{seed}"
        shutil.rmtree(work / name, ignore_errors=True)
        ckpts, metrics = work / name / "checkpoints", work / name / "metrics.jsonl"
        cmd = train_cmd(work, name, *SETS, f"train.seed={seed}")
        expected_resume = 0
        for k in range(kills_per_run):
            write = k % 2 == 1
            out = mid_write if write else mid_step
            done = _complete(ckpts)
            base = done[-1] if done else 0
            if base + 2 * EVERY > STEPS:
                break  # too close to the end for another kill
            log = work / f"{name}.{k}.log"
            with Timer(out), open(log, "w") as fh:
                extra = {}
                if write:
                    target = base + EVERY  # the next checkpoint: held half written, then killed
                    extra["SELFFLOW_FAULT_SAVE_DELAY"] = f"30@{target}"
                t_start = time.time()
                proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env(**extra), cwd=ROOT)
                if write:
                    ready = lambda t=target, c=ckpts, t0=t_start: _written_since(c / f"step_{t:08d}.pt.tmp", t0)  # noqa: E731
                else:
                    stop_at = rng.randint(base + 1, min(STEPS - 1, base + 2 * EVERY))
                    ready = lambda s=stop_at, m=metrics, t0=t_start: _last_logged(m, t0) >= s  # noqa: E731
                end = time.time() + 300
                while not ready() and proc.poll() is None and time.time() < end:
                    time.sleep(0.01)
                time.sleep(rng.uniform(0.0, 0.05 if not write else 0.3))
                proc.send_signal(signal.SIGKILL)
                proc.wait()
            text = log.read_text()
            resumed = re.search(r"resuming from .*step_(\d{8})\.pt \(step (\d+)\)", text)
            got = int(resumed.group(2)) if resumed else 0
            after = _complete(ckpts)
            ok = got == expected_resume and (not write or target not in after)
            ok = ok and proc.returncode == -signal.SIGKILL
            out.record(ok, why=f"seed {seed} kill {k}: resumed from {got}, expected {expected_resume}; "
                               f"complete {after}; exit {proc.returncode}; {text[-400:]}")
            expected_resume = after[-1] if after else 0
        final = run(cmd)
        text = final.stdout + final.stderr
        resumed = re.search(r"\(step (\d+)\)", final.stdout)
        got = losses(read_metrics(metrics)) if metrics.is_file() else []
        lost = lost_steps(ref, got)
        mid_step.data_lost += lost
        if final.returncode or (resumed and int(resumed.group(1)) != expected_resume) or lost:
            mid_step.failures.append(f"seed {seed} final run: exit {final.returncode}, {lost} steps differ: "
                                     f"{text[-600:]}")
            mid_step.passed = min(mid_step.passed, mid_step.trials - 1)
        if list(ckpts.glob("*.tmp")):
            mid_write.failures.append(f"seed {seed}: a .tmp file survived the finished run")
    for o in (mid_step, mid_write):
        o.note = f"{len(seeds)} runs of {STEPS} steps, losses compared exactly with uninterrupted runs"
    return [mid_step, mid_write]


def full_disk(work: Path, fail_at: tuple[int, ...] = (6, 12, 21)) -> list[Outcome]:
    """The checkpoint write at step N fails with ENOSPC: a clear stop, the previous checkpoint intact,
    and a rerun resumes from it to the reference losses."""
    from selfflow.core.checkpoint import load_checkpoint
    from selfflow.core.metrics import read_metrics

    out = Outcome("process", "disk full (ENOSPC) during a checkpoint save",
                  "stops with a clear error (exit 3); the previous checkpoint is intact")
    ref = _reference(work, 0)
    for n in fail_at:
        name = f"enospc{n}"
        shutil.rmtree(work / name, ignore_errors=True)
        cmd = train_cmd(work, name, *SETS, "train.seed=0")
        with Timer(out):
            stopped = run(cmd, SELFFLOW_FAULT_SAVE_ENOSPC=str(n))
            ckpts = work / name / "checkpoints"
            left = _complete(ckpts)
            intact = bool(left) and left[-1] == n - EVERY and load_checkpoint(ckpts / f"step_{n - EVERY:08d}.pt")
            clear = (stopped.returncode == 3 and "No space left on device" in stopped.stderr
                     and f"step_{n - EVERY:08d}.pt is intact" in stopped.stderr and "Traceback" not in stopped.stderr)
            again = run(cmd)
            lost = lost_steps(ref, losses(read_metrics(work / name / "metrics.jsonl")))
        ok = bool(intact) and clear and again.returncode == 0 and not list(ckpts.glob("*.tmp"))
        out.record(ok and not lost, crash="Traceback" in stopped.stderr, lost=lost,
                   why=f"step {n}: exit {stopped.returncode}, left {left}: {stopped.stderr[-500:]}")
    out.note = "then the same command resumes and finishes with the reference losses"
    return [out]


def killed_sampling(work: Path, kills: int = 6) -> list[Outcome]:
    """``selfflow sample --out-dir`` killed after a random number of finished batches, restarted until done;
    the final ``samples_N.npz`` must equal an uninterrupted call's."""
    out = Outcome("process", "SIGKILL during sample generation (selfflow sample --out-dir)",
                  "restart completes; samples identical to an uninterrupted call")
    runs = work / "samplerun"
    if not (runs / "ema.safetensors").is_file():
        proc = run(train_cmd(work, "samplerun", "train.steps=4", "train.batch_size=2", "sample.every=0"))
        if proc.returncode:
            raise RuntimeError(proc.stderr[-2000:])
    num, batch = 40, 4

    def cmd(dest: Path) -> list[str]:
        import sys

        return [sys.executable, "-m", "selfflow.core.cli", "sample", "--run", str(runs), "--num", str(num),
                "--batch-size", str(batch), "--out-dir", str(dest), "--steps", "2", "--no-progress",
                "--device", "cpu"]

    ref_dir, dest = work / "samples_ref", work / "samples_killed"
    for d in (ref_dir, dest):
        shutil.rmtree(d, ignore_errors=True)
    with Timer(out):
        ref = run(cmd(ref_dir))
    if ref.returncode:
        raise RuntimeError(ref.stderr[-2000:])
    rng = random.Random(7)
    for k in range(kills):
        with Timer(out):
            before = len(list((dest / "parts").glob("batch_*.npy"))) if (dest / "parts").is_dir() else 0
            proc = subprocess.Popen(cmd(dest), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    env=env(SELFFLOW_FAULT_SAMPLE_DELAY="0.2"), cwd=ROOT)
            target = before + rng.randint(1, 2)
            end = time.time() + 300
            while proc.poll() is None and time.time() < end and (
                    not (dest / "parts").is_dir() or len(list((dest / "parts").glob("batch_*.npy"))) < target):
                time.sleep(0.01)
            time.sleep(rng.uniform(0, 0.15))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        partial = list((dest / "parts").glob("*.tmp")) if (dest / "parts").is_dir() else []
        out.record(proc.returncode == -signal.SIGKILL, why=f"kill {k}: exit {proc.returncode}, {partial}")
    with Timer(out):
        final = run(cmd(dest))
    a = np.load(ref_dir / f"samples_{num}.npz")["arr_0"] if final.returncode == 0 else None
    b = np.load(dest / f"samples_{num}.npz")["arr_0"] if final.returncode == 0 else None
    lost = num if a is None else int(sum(not np.array_equal(x, y) for x, y in zip(a, b)) + abs(len(a) - len(b)))
    out.data_lost += lost
    if lost:
        out.failures.append(f"final: exit {final.returncode}, {lost} samples differ: {final.stderr[-500:]}")
        out.passed = min(out.passed, out.trials - 1)
    out.note = f"{num} samples in batches of {batch}, compared bit for bit"
    return [out]


def run_all(work: Path | None = None) -> list[Outcome]:
    work = Path(work or ROOT / "runs" / "reliability" / "process")
    work.mkdir(parents=True, exist_ok=True)
    return [*killed_runs(work), *full_disk(work), *killed_sampling(work)]
