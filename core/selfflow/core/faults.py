"""Clean-stop errors and the fault-injection hooks the reliability suite (``make fault-test``) drives.

A :class:`RunStopped` error ends a run on purpose with a message that says why and what is intact (the CLI
prints it and exits with status 3, no traceback). The hooks below do nothing unless their environment
variable is set; each is read where the fault would happen in production:

- ``SELFFLOW_FAULT_SAVE_DELAY=SECONDS[@STEP]``: hold a checkpoint's half-written ``.tmp`` open (kill mid-write).
- ``SELFFLOW_FAULT_SAVE_ENOSPC=STEP``: the checkpoint write of STEP fails with ``ENOSPC`` (a full disk).
- ``SELFFLOW_FAULT_SAVE_ERROR=STEP[@RANK]``: gathering the state of checkpoint STEP fails on RANK (default 0)
  with an error that is not a write error (a bug in a component's ``state_dict``, an unpicklable value).
- ``SELFFLOW_FAULT_KILL_AT=STEP[@RANK][,STEP[@RANK]…]``: SIGKILL this process after optimizer step STEP — each
  entry once per run directory (a marker file records it, so the restarted process does not kill itself again).
- ``SELFFLOW_FAULT_SIGNAL_AT=STEP[@RANK][:SIGNAL]``: send this process SIGNAL (default ``SIGTERM``; ``SIGINT``,
  ``SIGUSR1``) after optimizer step STEP — once per run directory, as ``SELFFLOW_FAULT_KILL_AT``.
- ``SELFFLOW_FAULT_NAN_AT=STEP[,STEP…]``: the batches of these (1-based) steps are replaced by NaNs.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch


def error_line(error: BaseException) -> str:
    """One line naming an error for a message or a report: its type and the first line of its text (≤ 300 chars)."""
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:300]}"


class RunStopped(RuntimeError):
    """A run stopped deliberately (too many bad steps or samples, a failed checkpoint write)."""


class RunInterrupted(RunStopped):
    """A run stopped cleanly on a signal (:mod:`~selfflow.core.stop_request`), its checkpoint written. The CLI
    exits with ``128 + signal``, the shell's code for a process ended by that signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def _env(name: str) -> str:
    return os.environ.get(name, "").strip()


def save_delay(step: int) -> None:
    """``SELFFLOW_FAULT_SAVE_DELAY``: sleep while the checkpoint file of ``step`` is half written."""
    spec = _env("SELFFLOW_FAULT_SAVE_DELAY")
    if not spec:
        return
    seconds, _, at = spec.partition("@")
    if not at or int(at) == step:
        time.sleep(float(seconds))


def save_enospc(step: int) -> None:
    """``SELFFLOW_FAULT_SAVE_ENOSPC``: fail the checkpoint write of ``step`` as a full disk would."""
    spec = _env("SELFFLOW_FAULT_SAVE_ENOSPC")
    if spec and int(spec) == step:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def save_error(step: int, rank: int) -> None:
    """``SELFFLOW_FAULT_SAVE_ERROR``: fail gathering the state of checkpoint ``step`` on one rank."""
    spec = _env("SELFFLOW_FAULT_SAVE_ERROR")
    if not spec:
        return
    at, _, who = spec.partition("@")
    if int(at) == step and int(who or 0) == rank:
        raise ValueError(f"injected fault (SELFFLOW_FAULT_SAVE_ERROR={spec}) while gathering the state of step {step}")


def _once_at(name: str, marker: str, step: int, rank: int, run_dir: str | Path) -> str | None:
    """The ``SIGNAL`` part of a ``STEP[@RANK][:SIGNAL][,…]`` hook's entry that is due now, each entry once per
    run directory (a marker file records it, so the restarted process does not fault again); ``None`` when none
    is due. Several entries fault one run several times (a torchrun group restarted more than once)."""
    for entry in filter(None, (e.strip() for e in _env(name).split(","))):
        where, _, what = entry.partition(":")
        at, _, who = where.partition("@")
        if int(at) != step or int(who or 0) != rank:
            continue
        path = Path(run_dir) / f".fault_{marker}_{step}_{rank}"
        if path.exists():
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        return what
    return None


def kill_point(step: int, rank: int, run_dir: str | Path) -> None:
    """``SELFFLOW_FAULT_KILL_AT``: SIGKILL this process once, after ``step`` on ``rank`` (default 0); then
    ``SELFFLOW_FAULT_SIGNAL_AT``: send it a stop signal the same way."""
    if _once_at("SELFFLOW_FAULT_KILL_AT", "killed", step, rank, run_dir) is not None:
        os.kill(os.getpid(), signal.SIGKILL)
    what = _once_at("SELFFLOW_FAULT_SIGNAL_AT", "signalled", step, rank, run_dir)
    if what is not None:
        os.kill(os.getpid(), signal.Signals[what or "SIGTERM"])


def poison_batches(batches: list[dict[str, Any]], step: int) -> list[dict[str, Any]]:
    """``SELFFLOW_FAULT_NAN_AT``: NaN every floating tensor of the batches of (1-based) ``step``."""
    spec = _env("SELFFLOW_FAULT_NAN_AT")
    if not spec or step not in {int(s) for s in spec.split(",") if s.strip()}:
        return batches
    return [{k: torch.full_like(v, float("nan")) if torch.is_tensor(v) and v.is_floating_point() else v
             for k, v in b.items()} for b in batches]
