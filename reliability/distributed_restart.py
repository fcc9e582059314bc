"""Distributed faults: a rank dies under ``torchrun --max-restarts`` (2 gloo ranks on CPU), once or twice a run.

``SELFFLOW_FAULT_KILL_AT=STEP@RANK`` makes that rank SIGKILL itself once after optimizer step STEP (a marker
file in the run directory stops the restarted worker from doing it again). torchrun's agent tears the group
down and restarts both workers, which must resume from the newest complete checkpoint and finish with the
losses of an uninterrupted 2-rank run. A save that fails on one rank — a full disk on rank 0
(``SELFFLOW_FAULT_SAVE_ENOSPC``), or any other error while gathering the state on either rank
(``SELFFLOW_FAULT_SAVE_ERROR=STEP@RANK``) — must stop every rank with the message, not leave the others
waiting in the next collective. Under FSDP2, where gathering the state is itself a collective, a rank failing
inside that gather stops alone with the message and torchrun stops the other (no gloo abort, no hang).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from subprocess import CompletedProcess, TimeoutExpired
from typing import NamedTuple

from .common import ROOT, Outcome, Timer, losses, lost_steps, run, train_cmd

SETS = ("train.steps=16", "checkpoint.every=4", "train.batch_size=2", "sample.every=0",
        "train.parallel=ddp")


def run_all(work: Path | None = None, kills: tuple[tuple[int, int], ...] = ((6, 1), (11, 0))) -> list[Outcome]:
    from selfflow.core.checkpoint import list_checkpoints
    from selfflow.core.metrics import read_metrics

    work = Path(work or ROOT / "runs" / "reliability" / "distributed")
    work.mkdir(parents=True, exist_ok=True)
    out = Outcome("distributed", "a rank SIGKILLed under torchrun --max-restarts=1 (2 gloo ranks)",
                  "workers restart, resume from the last checkpoint; losses equal the reference")
    reference = _reference(work, "ref", SETS)
    for step, rank in kills:
        name = f"kill{step}r{rank}"
        shutil.rmtree(work / name, ignore_errors=True)
        with Timer(out):
            proc = run(train_cmd(work, name, *SETS, nproc=2, max_restarts=1), timeout=900,
                       SELFFLOW_FAULT_KILL_AT=f"{step}@{rank}")
        text = proc.stdout + proc.stderr
        resumed = re.search(r"resuming from \S+ \(step (\d+)\)", text)
        expected = step // 4 * 4
        got = losses(read_metrics(work / name / "metrics.jsonl")) if (work / name / "metrics.jsonl").is_file() else []
        lost = lost_steps(reference, got)
        fired = (work / name / f".fault_killed_{step}_{rank}").exists()
        ok = (proc.returncode == 0 and fired and resumed is not None and int(resumed.group(1)) == expected
              and [s for s, _ in list_checkpoints(work / name / "checkpoints")][-1] == 16)
        out.record(ok and not lost, crash=proc.returncode != 0, lost=lost,
                   why=f"kill rank {rank} at step {step}: exit {proc.returncode}, fired {fired}, "
                       f"resumed {resumed.group(1) if resumed else None} (expected {expected}), {lost} steps "
                       f"differ: {text[-800:]}")
    out.note = "16 steps, DDP, checkpoint every 4; kills at " + ", ".join(f"step {s} rank {r}" for s, r in kills)
    return [out, restarted_twice(work, reference), full_disk(work, reference), save_error(work, reference),
            save_error_fsdp2(work)]


def restarted_twice(work: Path, reference: list[tuple], kills: str = "6@1,11@0") -> Outcome:
    """Two ranks SIGKILLed in turn in one run: under ``--max-restarts=2`` the group restarts twice, resuming from
    checkpoint 4 and then 8, and finishes with the reference losses; under ``--max-restarts=1`` the second death
    spends the restarts, torchrun stops with checkpoint 8 intact, and the same command resumes from it."""
    from selfflow.core.checkpoint import list_checkpoints
    from selfflow.core.metrics import read_metrics

    out = Outcome("distributed", "two ranks SIGKILLed in turn, one run: torchrun --max-restarts=2, then =1",
                  "=2: two restarts, resuming from 4 then 8, reference losses; =1: stops with checkpoint 8 intact, "
                  "the same command resumes to the reference")
    name = "two_kills"
    shutil.rmtree(work / name, ignore_errors=True)
    with Timer(out):
        proc = run(train_cmd(work, name, *SETS, nproc=2, max_restarts=2), timeout=900, SELFFLOW_FAULT_KILL_AT=kills)
    text = proc.stdout + proc.stderr
    resumed = list(dict.fromkeys(int(s) for s in re.findall(r"resuming from \S+ \(step (\d+)\)", text)))
    fired = sorted(p.name for p in (work / name).glob(".fault_killed_*"))
    got = losses(read_metrics(work / name / "metrics.jsonl")) if (work / name / "metrics.jsonl").is_file() else []
    lost = lost_steps(reference, got)
    ok = proc.returncode == 0 and len(fired) == 2 and resumed == [4, 8]
    out.record(ok and not lost, crash=proc.returncode != 0, lost=lost,
               why=f"--max-restarts=2: exit {proc.returncode}, fired {fired}, resumed from {resumed} (expected [4, "
                   f"8]), {lost} steps differ: {text[-800:]}")

    r = fault_then_rerun(out, work, "two_kills_one_restart", SETS, reference, {"SELFFLOW_FAULT_KILL_AT": kills},
                         timeout=600, max_restarts=1)
    if r is None:
        out.record(False, crash=True, why="--max-restarts=1: the run hung (killed after 600 s)")
    else:
        again = re.search(r"resuming from \S+ \(step (\d+)\)", r.again.stdout + r.again.stderr)
        ok = (r.stopped.returncode != 0 and r.left and r.left[-1] == 8 and r.again.returncode == 0
              and again is not None and int(again.group(1)) == 8
              and [s for s, _ in list_checkpoints(work / "two_kills_one_restart" / "checkpoints")][-1] == 16)
        out.record(ok and not r.lost, lost=r.lost,
                   why=f"--max-restarts=1: exit {r.stopped.returncode}, left {r.left}, rerun exit {r.again.returncode}"
                       f" resuming from {again.group(1) if again else None}: {r.stopped.stderr[-800:]}")
    out.note = (f"kills {kills.replace(',', ', ')} (step@rank); 16 steps, DDP, checkpoint every 4; with one restart "
                "the second death ends the run (nonzero exit) and the rerun resumes from step 8")
    return out


def _reference(work: Path, name: str, sets: tuple[str, ...]) -> list[tuple]:
    """The losses of an uninterrupted 2-rank run of ``sets``."""
    from selfflow.core.metrics import read_metrics

    shutil.rmtree(work / name, ignore_errors=True)
    ref = run(train_cmd(work, name, *sets, nproc=2), timeout=900)
    if ref.returncode:
        raise RuntimeError(f"reference 2-rank run {name} failed: {ref.stderr[-2000:]}")
    return losses(read_metrics(work / name / "metrics.jsonl"))


class FaultyRun(NamedTuple):
    stopped: CompletedProcess  # the run with the fault
    left: list[int]  # the checkpoints it left
    again: CompletedProcess  # the same command, without the fault
    lost: int  # steps of the rerun whose losses differ from the reference


def fault_then_rerun(out: Outcome, work: Path, name: str, sets: tuple[str, ...], reference: list[tuple],
                     fault: dict[str, str], timeout: int = 300, max_restarts: int = 0) -> FaultyRun | None:
    """2 ranks run ``sets`` with the fault hook ``fault`` (its environment variable), then the same command again
    without it; None when the faulty run hung (killed after ``timeout`` s): the others waited in a collective."""
    from selfflow.core.checkpoint import list_checkpoints
    from selfflow.core.metrics import read_metrics

    shutil.rmtree(work / name, ignore_errors=True)
    cmd = train_cmd(work, name, *sets, nproc=2, max_restarts=max_restarts)
    with Timer(out):
        try:
            stopped = run(cmd, timeout=timeout, **fault)
        except TimeoutExpired:
            return None
        left = [s for s, _ in list_checkpoints(work / name / "checkpoints")]
        again = run(cmd, timeout=600)
    return FaultyRun(stopped, left, again, lost_steps(reference, losses(read_metrics(work / name / "metrics.jsonl"))))


def full_disk(work: Path, reference: list[tuple], at: int = 8) -> Outcome:
    """ENOSPC while rank 0 writes checkpoint ``at``: every rank stops with the message (no hang), the previous
    checkpoint is intact, and the same command then resumes to the reference losses."""
    out = Outcome("distributed", "disk full (ENOSPC) during a save on 2 ranks",
                  "all ranks stop with the error; previous checkpoint intact; rerun resumes")
    r = fault_then_rerun(out, work, "enospc", SETS, reference, {"SELFFLOW_FAULT_SAVE_ENOSPC": str(at)}, timeout=600)
    if r is None:
        out.record(False, crash=True, why="the run hung (killed after 600 s)")
        return out
    text = r.stopped.stdout + r.stopped.stderr
    ok = (r.stopped.returncode != 0 and text.count("selfflow: stopped: cannot write checkpoint") == 2
          and "No space left on device" in text and r.left and r.left[-1] == at - 4 and r.again.returncode == 0)
    out.record(ok and not r.lost, lost=r.lost, why=f"exit {r.stopped.returncode}, left {r.left}, rerun exit "
                                                    f"{r.again.returncode}: {text[-800:]}")
    out.note = f"checkpoint {at} fails on rank 0; both ranks print the stop message"
    return out


def save_error(work: Path, reference: list[tuple], at: int = 8) -> Outcome:
    """An error that is not a write error (here: while gathering the state) on one rank during checkpoint
    ``at``: both ranks stop with the message naming the checkpoint and that rank within seconds (no hang
    until the process group's timeout), nothing is written (every rank's data position belongs in the
    checkpoint), the previous checkpoint is intact, and a rerun resumes to the reference losses."""
    out = Outcome("distributed", "an error other than a failed write during a save, on one of 2 ranks",
                  "all ranks stop naming the checkpoint and rank (no hang); no torn checkpoint; rerun resumes")
    for rank in (0, 1):
        name = f"save_error_r{rank}"
        r = fault_then_rerun(out, work, name, SETS, reference, {"SELFFLOW_FAULT_SAVE_ERROR": f"{at}@{rank}"})
        if r is None:  # the other rank waited in a collective: the fault this case guards against
            out.record(False, crash=True, why=f"rank {rank} failing: the run hung (killed after 300 s)")
            continue
        text = r.stopped.stdout + r.stopped.stderr
        path = work / name / "checkpoints" / f"step_{at:08d}.pt"
        message = f"selfflow: stopped: cannot write checkpoint {path}: rank {rank} failed"
        ok = (r.stopped.returncode != 0 and text.count(message) == 2 and "SELFFLOW_FAULT_SAVE_ERROR" in text
              and r.left and r.left[-1] == at - 4 and r.again.returncode == 0)
        out.record(ok and not r.lost, lost=r.lost, why=f"rank {rank} failing: exit {r.stopped.returncode}, left "
                                                        f"{r.left}, rerun exit {r.again.returncode}: {text[-800:]}")
    out.note = (f"checkpoint {at} fails on rank 0, then on rank 1 (`SELFFLOW_FAULT_SAVE_ERROR`); both ranks "
                "print the stop message")
    return out


def save_error_fsdp2(work: Path, at: int = 8) -> Outcome:
    """Under FSDP2, rank 1 fails inside the sharded gather of checkpoint ``at``: the run stops within seconds
    with that rank's message (no gloo abort from mismatched collectives, no hang), checkpoint ``at - 4`` is the
    newest, and a rerun resumes to the losses of an uninterrupted FSDP2 run."""
    out = Outcome("distributed", "an error inside the sharded (FSDP2) gather of a save, on rank 1 of 2",
                  "the run stops with that rank's message (no abort, no hang); rerun resumes")
    sets = (*[s for s in SETS if not s.startswith("train.parallel")], "train.parallel=fsdp2")
    reference = _reference(work, "fsdp_ref", sets)
    name = "fsdp_save_error"
    r = fault_then_rerun(out, work, name, sets, reference, {"SELFFLOW_FAULT_SAVE_ERROR": f"{at}@1"})
    if r is None:
        out.record(False, crash=True, why="the run hung (killed after 300 s)")
        return out
    text = r.stopped.stdout + r.stopped.stderr
    path = work / name / "checkpoints" / f"step_{at:08d}.pt"
    message = f"selfflow: stopped: cannot write checkpoint {path}: rank 1 failed gathering the sharded state"
    ok = (r.stopped.returncode != 0 and message in text and "terminate called" not in text
          and r.left and r.left[-1] == at - 4 and r.again.returncode == 0)
    out.record(ok and not r.lost, crash="terminate called" in text, lost=r.lost,
               why=f"exit {r.stopped.returncode}, left {r.left}, rerun exit {r.again.returncode}: {text[-800:]}")
    out.note = f"FSDP2, checkpoint {at} fails on rank 1 inside the gather; the rerun matches an FSDP2 reference"
    return out
