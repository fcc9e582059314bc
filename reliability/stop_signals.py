"""Stop signals: a run asked to stop (SIGTERM, SIGUSR1, Ctrl-C's SIGINT) finishes its step, writes a checkpoint
of it and exits with ``128 + signal``; the same command then resumes there with the uninterrupted losses.

``SELFFLOW_FAULT_SIGNAL_AT=STEP[@RANK][:SIGNAL]`` sends the signal once after optimizer step STEP, on one
process and on one rank of two (the others learn it through the step's loss reduction and stop after the same
step). Last, the torchrun agent itself is SIGKILLed mid-run from outside: its workers (in sessions of their
own) must stop cleanly too — they asked the kernel for SIGTERM on their parent's death — not train on unseen.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .common import ROOT, Outcome, Timer, env, losses, lost_steps, run, train_cmd

SETS = ("train.steps=16", "checkpoint.every=4", "train.batch_size=2", "sample.every=0")
# (step, rank, signal): one process for rank None, else that rank of 2
SIGNALS = ((6, None, "SIGTERM"), (9, None, "SIGUSR1"), (13, None, "SIGINT"), (6, 1, "SIGTERM"), (9, 0, "SIGUSR1"))


def run_all(work: Path | None = None) -> list[Outcome]:
    work = Path(work or ROOT / "runs" / "reliability" / "signals")
    work.mkdir(parents=True, exist_ok=True)
    return [stop_signal(work), stop_at_evaluation(work), agent_killed(work)]


def _reference(work: Path, name: str, sets: tuple[str, ...], nproc: int) -> list[tuple]:
    from selfflow.core.metrics import read_metrics

    shutil.rmtree(work / name, ignore_errors=True)
    proc = run(train_cmd(work, name, *sets, nproc=nproc), timeout=900)
    if proc.returncode:
        raise RuntimeError(f"reference run {name} failed: {proc.stderr[-2000:]}")
    return losses(read_metrics(work / name / "metrics.jsonl"))


def _stopped_then_rerun(out: Outcome, work: Path, name: str, sets: tuple[str, ...], nproc: int, fault: str,
                        look: Callable[[Path], Any] = lambda run_dir: None) -> tuple[Any, list[int], Any, Any]:
    """Run ``name`` afresh with ``SELFFLOW_FAULT_SIGNAL_AT=fault``, then the same command again (timed into
    ``out``): the stopped run, the checkpoint steps it left, what ``look(run_dir)`` saw then, and the rerun."""
    from selfflow.core.checkpoint import list_checkpoints

    shutil.rmtree(work / name, ignore_errors=True)
    cmd = train_cmd(work, name, *sets, nproc=nproc)
    with Timer(out):
        stopped = run(cmd, timeout=300, SELFFLOW_FAULT_SIGNAL_AT=fault)
        left = [s for s, _ in list_checkpoints(work / name / "checkpoints")]
        seen = look(work / name)
        again = run(cmd, timeout=600)
    return stopped, left, seen, again


def _scores(run_dir: Path) -> list[dict]:
    """The online evaluation's records of a run (those without a loss)."""
    from selfflow.core.metrics import read_metrics

    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" not in r]


def stop_signal(work: Path) -> Outcome:
    from selfflow.core.metrics import read_metrics

    out = Outcome("process", "a stop signal mid-run (SIGTERM / SIGUSR1 / SIGINT), 1 process or 1 rank of 2",
                  "checkpoint of the step, exit 128+signal, no traceback; rerun resumes to the reference losses")
    references = {n: _reference(work, f"ref{n}", SETS, n) for n in (1, 2)}
    for step, rank, sig in SIGNALS:
        nproc = 1 if rank is None else 2
        name = f"{sig.lower()}_{step}_{nproc}"
        stopped, left, _, again = _stopped_then_rerun(out, work, name, SETS, nproc, f"{step}@{rank or 0}:{sig}")
        text = stopped.stdout + stopped.stderr
        at = step if nproc == 1 else step + 1  # 2 ranks agree in the next step's reduction
        code = 128 + int(signal.Signals[sig])
        # 2 ranks: the rank the signal missed exits as on SIGTERM; torchrun reports both
        exited = (stopped.returncode == code if nproc == 1
                  else len(re.findall(rf"exitcode  : (?:{code}|143) ", text)) == 2)
        lost = lost_steps(references[nproc], losses(read_metrics(work / name / "metrics.jsonl")))
        crash = text.count("Traceback") > text.count("ChildFailedError:")  # torchrun's own report has one
        ok = (exited and f"selfflow: stopped: {sig}" in text and f"at step {at} of 16" in text
              and not crash and left and left[-1] == at and again.returncode == 0)
        out.record(ok and not lost, crash=crash, lost=lost,
                   why=f"{sig} after step {step} on {nproc} process(es): exit {stopped.returncode}, left {left}, "
                       f"rerun exit {again.returncode}, {lost} steps differ: {text[-800:]}")
    out.note = "; ".join(f"{sig} after step {s} ({'1 process' if r is None else f'rank {r} of 2'})"
                         for s, r, sig in SIGNALS)
    return out


def stop_at_evaluation(work: Path) -> Outcome:
    """SIGTERM after step 8, whose online evaluation is due: one process reads it before the evaluation, the
    ranks of a two-rank run (rank 1 signalled after the step's reduction) before its first batch of samples. The
    evaluation must not hold the stop up: it is left pending in the step's checkpoint, and the rerun scores step 8
    first — losses and scores of the uninterrupted run."""
    from selfflow.core.metrics import read_metrics

    out = Outcome("process", "a stop signal at a step whose online evaluation is due, 1 process or 1 rank of 2",
                  "the evaluation left pending in the step's checkpoint; the rerun scores it first, with the "
                  "reference's losses and scores")
    sets = (*SETS, "eval.every=4", "eval.num_samples=4", "eval.batch_size=1")
    for nproc, rank in ((1, 0), (2, 1)):
        reference = _reference(work, f"eval_ref{nproc}", sets, nproc)
        name = f"eval_stop_{nproc}"
        stopped, left, scored_before, again = _stopped_then_rerun(
            out, work, name, sets, nproc, f"8@{rank}:SIGTERM", lambda run_dir: [r["step"] for r in _scores(run_dir)])
        text = stopped.stdout + stopped.stderr
        lost = lost_steps(reference, losses(read_metrics(work / name / "metrics.jsonl")))
        same_scores = _scores(work / name) == _scores(work / f"eval_ref{nproc}")
        crash = text.count("Traceback") > text.count("ChildFailedError:")
        ok = ("selfflow: a stop came before the evaluation of step 8 ended" in text and "at step 8 of 16" in text
              and left and left[-1] == 8 and scored_before == [4] and again.returncode == 0 and same_scores)
        out.record(bool(ok) and not crash and not lost, crash=crash, lost=lost,
                   why=f"{nproc} process(es): left {left}, scored before the rerun {scored_before}, rerun exit "
                       f"{again.returncode}, same scores {same_scores}, {lost} steps differ: {text[-800:]}")
    out.note = "eval every 4 steps, SIGTERM after step 8: 1 process; rank 1 of 2 (DDP)"
    return out


def agent_killed(work: Path, steps: int = 400) -> Outcome:
    """SIGKILL of the torchrun agent (2 gloo ranks) after ~50 steps: both workers stop within seconds with a
    checkpoint, and the rerun resumes to the losses of an uninterrupted run."""
    from selfflow.core.checkpoint import list_checkpoints
    from selfflow.core.metrics import read_metrics

    out = Outcome("distributed", "the torchrun agent SIGKILLed mid-run (its workers in sessions of their own)",
                  "the workers stop cleanly with a checkpoint (none left running); rerun resumes to the reference")
    sets = (f"train.steps={steps}", f"checkpoint.every={steps // 2}", "train.batch_size=2", "sample.every=0")
    reference = _reference(work, "agent_ref", sets, 2)
    name, metrics = "agent_killed", work / "agent_killed" / "metrics.jsonl"
    shutil.rmtree(work / name, ignore_errors=True)
    cmd = train_cmd(work, name, *sets, nproc=2)
    with Timer(out):
        agent = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env(), cwd=ROOT,
                                 start_new_session=True)
        deadline = time.time() + 300
        while time.time() < deadline and agent.poll() is None and not _logged(metrics, 50):
            time.sleep(0.1)
        workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True,
                                                  text=True).stdout.split()]
        agent.kill()
        agent.wait()
        while time.time() < deadline and any(_running(w) for w in workers):
            time.sleep(0.1)
        survivors = [w for w in workers if _running(w)]
        for w in survivors:  # do not leave them to the next trial
            os.kill(w, signal.SIGKILL)
        left = [s for s, _ in list_checkpoints(work / name / "checkpoints")]
        again = run(cmd, timeout=600)
    lost = lost_steps(reference, losses(read_metrics(metrics)))
    ok = len(workers) == 2 and not survivors and bool(left) and 50 <= left[-1] < steps and again.returncode == 0
    out.record(ok and not lost, lost=lost, why=f"workers {workers}, survivors {survivors}, left {left}, rerun exit "
                                               f"{again.returncode}, {lost} steps differ: {again.stderr[-800:]}")
    out.note = f"{steps} steps, DDP; the agent killed after ~50; the workers' stop checkpoint: step {left[-1] if left else None}"
    return out


def _logged(path: Path, steps: int) -> bool:
    try:
        with open(path) as f:
            return sum(1 for _ in f) >= steps
    except OSError:
        return False


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for init to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
