"""A clean stop on a signal: the training loop finishes its step, writes a checkpoint and ends.

The signals that come before a kill are caught while :meth:`Trainer.fit` runs: ``SIGTERM`` (what torchrun
forwards when its own process is stopped, and what SLURM and Kubernetes send before ``SIGKILL``),
``SIGUSR1`` (SLURM's ``--signal=USR1@SECONDS``, a warning ahead of the time limit) and ``SIGINT`` (Ctrl-C).
The handler only records the signal; the loop reads it at the end of each step. Ranks agree on the step to
stop at through the step's own loss reduction (the flag rides along with the losses), before each batch of
an online evaluation's samples and once more after a preview, evaluation or checkpoint (a signal may arrive
during them), so a signal that reaches one rank stops every rank at the same step, with one checkpoint. An
evaluation a stop interrupts, or finds due, is left pending in that checkpoint; the resumed run does it first.
A second Ctrl-C stops a plain process at once (``KeyboardInterrupt``: the last complete checkpoint stays the
newest; torchrun passes on only the first).

Under ``torchrun`` each worker also asks the kernel for ``SIGTERM`` when its agent dies
(:func:`stop_with_parent`): a ``kill -9`` of the agent used to leave its workers training on, unseen.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
import weakref
from collections.abc import Iterable, Iterator
from types import FrameType
from typing import Any, TypeVar

log = logging.getLogger("selfflow")

T = TypeVar("T")
STOP_SIGNALS = tuple(s for s in (getattr(signal, n, None) for n in ("SIGTERM", "SIGINT", "SIGUSR1")) if s)


class StopRequest:
    """Which stop signal arrived first while :meth:`installed` was active (``None``: none yet)."""

    def __init__(self) -> None:
        self.signal: signal.Signals | None = None

    @staticmethod
    def agreed_signal(requests: float, signums: float) -> signal.Signals:
        """The signal to report from a reduction of ``(requested, signal number)`` over ranks (sums, or means
        alike): the one the ranks that were asked received, or ``SIGTERM`` when they received different ones."""
        try:
            sig = signal.Signals(round(signums / requests))
        except (ValueError, ZeroDivisionError):
            return signal.SIGTERM
        return sig if sig in STOP_SIGNALS and abs(signums / requests - sig) < 1e-6 else signal.SIGTERM

    def for_reduction(self) -> dict[str, float]:
        """This rank's part of a reduction (a mean or a sum over ranks) that tells every rank whether any was
        asked to stop; :meth:`agreed_in` reads the result."""
        return {"stop_requested": float(self.requested), "stop_signal": float(self.signal or 0)}

    @staticmethod
    def agreed_in(reduced: dict[str, float]) -> signal.Signals | None:
        """Take :meth:`for_reduction`'s values out of ``reduced``: the signal every rank stops for (``None``:
        no rank was asked)."""
        requests, signums = reduced.pop("stop_requested"), reduced.pop("stop_signal")
        return StopRequest.agreed_signal(requests, signums) if requests > 0 else None

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        """Catch the stop signals for the duration, then restore the handlers that were there: those set from
        Python, the defaults, and one installed in C that Python does not see (``faulthandler.register``'s, say),
        which :func:`_c_handlers` saves and puts back. Outside the main thread (where Python cannot install
        handlers) this does nothing: the signals act as before."""
        self.signal = None  # a new fit() on the same trainer starts unasked
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        # A background job of a non-interactive shell inherits SIGINT ignored (POSIX): the shell's Ctrl-C is not
        # meant for it, so it stays ignored. SIGTERM and SIGUSR1 are always a scheduler's request.
        caught = [s for s in STOP_SIGNALS if not (s == signal.SIGINT and signal.getsignal(s) is signal.SIG_IGN)]
        # Python reports a handler set in C as the default (or None): restoring that would drop the C handler.
        unseen = [s for s in caught if not callable(signal.getsignal(s))]
        with _c_handlers(unseen):
            previous = {s: signal.signal(s, self._handle) for s in caught}
            try:
                yield self
            finally:
                for s, handler in previous.items():
                    signal.signal(s, signal.SIG_DFL if handler is None else handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        sig = signal.Signals(signum)
        if self.signal is not None:
            if sig == signal.SIGINT:  # Ctrl-C twice: the user does not want to wait for the checkpoint
                raise KeyboardInterrupt
            return
        self.signal = sig
        # torchrun passes on only the first Ctrl-C: the hint would promise what it cannot do there
        again = " (Ctrl-C again to stop at once)" if sig == signal.SIGINT and "TORCHELASTIC_RUN_ID" not in os.environ \
            else ""
        log.warning("selfflow: %s received: stopping after this step with a checkpoint%s", sig.name, again)


@contextlib.contextmanager
def _c_handlers(signals: list[signal.Signals]) -> Iterator[None]:
    """Save the C-level actions of ``signals`` (``sigaction``) and put them back on exit, after Python's own
    restore. The action is kept as opaque bytes: a buffer larger than any libc's ``struct sigaction``, so no
    layout is assumed. Where libc cannot be reached this does nothing."""
    saved: dict[signal.Signals, ctypes.Array] = {}
    libc = None
    if signals and os.name == "posix":
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            for s in signals:
                action = ctypes.create_string_buffer(1024)
                if libc.sigaction(int(s), None, action) == 0:
                    saved[s] = action
        except (OSError, AttributeError):
            saved = {}
    try:
        yield
    finally:
        for s, action in saved.items():
            libc.sigaction(int(s), action, None)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """A DataLoader ``worker_init_fn``: the workers leave the stop signals to the training process. A terminal's
    Ctrl-C and SLURM's signals reach every process of the job; a worker that died of one would fail the batch
    being fetched ("worker exited unexpectedly") before the trainer could stop cleanly. The workers end with
    their loader (or with the training process: they watch it); iterate such a loader with
    :func:`iterate_signal_ignoring_loader`, which also ends them when the process exits on an error."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


_signal_ignoring_workers: weakref.WeakSet[Any] = weakref.WeakSet()
_kill_registered = False


def _kill_signal_ignoring_workers() -> None:
    """At exit, before multiprocessing's own hook (atexit runs the later registration first): that one stops
    daemonic children with ``SIGTERM`` and joins them — workers that ignore it kept an exiting process (a
    crash with a live loader, whose iterator a traceback still holds) waiting forever."""
    for worker in list(_signal_ignoring_workers):
        if worker.is_alive():
            worker.kill()


def iterate_signal_ignoring_loader(loader: Iterable[T]) -> Iterator[T]:
    """Iterate a DataLoader whose workers run :func:`ignore_stop_signals`; its workers are shut down when the
    iteration ends or is abandoned, and killed if the process exits while they live."""
    global _kill_registered
    it = iter(loader)  # starts the workers: multiprocessing (and its exit hook) is imported by now
    if not _kill_registered:
        atexit.register(_kill_signal_ignoring_workers)
        _kill_registered = True
    _signal_ignoring_workers.update(getattr(it, "_workers", ()))  # torch's worker processes (num_workers > 0)
    try:
        yield from it
    finally:
        if callable(shutdown := getattr(it, "_shutdown_workers", None)):
            shutdown()


def stop_with_parent() -> bool:
    """Ask the kernel to send this process ``SIGTERM`` when its parent dies (Linux's ``PR_SET_PDEATHSIG``).
    For ``torchrun`` workers: the agent starts them in sessions of their own, so a ``kill -9`` of the agent
    (or of its terminal's process group) leaves them running — and a rerun then has two jobs writing one run
    directory. With this, they stop cleanly as on any ``SIGTERM``. Returns whether it is in effect."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(1, int(signal.SIGTERM), 0, 0, 0) == 0  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return False
