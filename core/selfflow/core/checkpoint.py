"""Checkpoints: one file per step holding the full training state, written atomically.

A checkpoint is written to ``<name>.tmp`` then renamed, so a crash mid-write never leaves a file that
looks complete; only ``step_XXXXXXXX.pt`` files are ever loaded, always with ``weights_only=True`` (no
pickled code runs). Older checkpoints beyond ``keep_last`` are deleted after a successful write. A failed
write (a full disk, a read-only disk) removes its temporary file as far as it can, leaves the previous
checkpoints alone and raises :class:`CheckpointWriteError`, which stops the run with a message naming both
files. State holding NaN or ±inf is never written nor loaded (the message names the file and the tensor), and
a resume skips a truncated, empty or non-finite newest checkpoint for the newest intact one
(:func:`load_newest_intact`).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from . import faults

_NAME = re.compile(r"^step_(\d{8})\.pt$")


class CheckpointWriteError(faults.RunStopped):
    """Writing a checkpoint failed (e.g. no space left); the previous checkpoints are intact."""


class CheckpointLoadError(ValueError):
    """A checkpoint or weights file cannot be loaded safely (pickled code, truncated, not finite …)."""


def checkpoint_path(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"step_{step:08d}.pt"


def list_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints as ``(step, path)``, oldest first (temporary files are ignored)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def latest_checkpoint(directory: str | Path) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def resume_hint(directory: str | Path, fix: str = "fix the error") -> str:
    """The end of a failed save's message: which earlier checkpoint the same command resumes from, or that the
    run starts over (no checkpoint was written before this one)."""
    previous = latest_checkpoint(directory)
    if previous is None:
        return f"No earlier checkpoint exists: {fix} and run the same command again to start the run over"
    return f"The previous checkpoint {previous} is intact: {fix} and run the same command again to resume from it"


def nonfinite_tensor(state: Any, where: str = "") -> str | None:
    """``"<where>['key'] holds NaN"`` for the first floating-point tensor in ``state`` (nested dicts, lists
    and tuples) holding NaN or ±inf; ``None`` when every tensor is finite."""
    if isinstance(state, torch.Tensor):
        if (state.is_floating_point() or state.is_complex()) and not bool(torch.isfinite(state).all()):
            return f"{where or 'tensor'} holds {'NaN' if bool(torch.isnan(state).any()) else 'inf'}"
        return None
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, list | tuple) else ()
    for key, value in items:
        found = nonfinite_tensor(value, f"{where}[{key!r}]" if where else str(key))
        if found:
            return found
    return None


def save_checkpoint(state: dict[str, Any], directory: str | Path, step: int, keep_last: int = 2) -> Path:
    """Atomically write ``state`` as step ``step``; prune to the newest ``keep_last``. Non-finite state is
    refused (:class:`CheckpointWriteError`), so a checkpoint on disk always holds finite numbers."""
    d = Path(directory)
    final = checkpoint_path(d, step)
    tmp = final.with_name(final.name + ".tmp")
    bad = nonfinite_tensor(state)
    if bad:
        raise CheckpointWriteError(
            f"refusing to write checkpoint {final}: {bad}. {resume_hint(d, 'lower optim.lr or check the data')}.")
    try:
        d.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            faults.save_delay(step)  # fault hooks: no-ops unless their env variable is set
            faults.save_enospc(step)
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException as e:
        # Best effort: on a read-only disk the cleanup fails too, and must not hide the original error.
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError | RuntimeError) and not isinstance(e, faults.RunStopped):
            raise CheckpointWriteError(
                f"cannot write checkpoint {final}: {e}. {resume_hint(d, 'free space (or fix the error)')}.") from e
        raise
    with contextlib.suppress(OSError):  # pruning is housekeeping: the new checkpoint is safely written
        for _, old in list_checkpoints(d)[:-keep_last]:
            if old != final:
                old.unlink(missing_ok=True)
        for stale in d.glob("step_*.pt.tmp"):  # left by a process killed mid-write
            stale.unlink(missing_ok=True)
    return final


def not_a_torch_file(path: str | Path) -> bool:
    """``path`` starts with bytes of neither format ``torch.save`` writes (a zip archive, a legacy pickle)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return bool(head) and not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"))


def unreadable_torch_file(path: str | Path, e: BaseException, what: str = "checkpoint") -> CheckpointLoadError:
    """A one-line reason why ``torch.load`` (or ``torch.jit.load``) failed on ``path``, a ``what``."""
    if not_a_torch_file(path):
        return CheckpointLoadError(f"{what} {path} is truncated or corrupt (not a PyTorch file)")
    if isinstance(e, pickle.UnpicklingError):  # the weights-only unpickler refused an object
        return CheckpointLoadError(f"cannot load {what} {path} safely (weights_only=True): it holds objects "
                                   f"other than tensors and plain containers ({str(e).splitlines()[0][:200]})")
    first = (str(e).split(". ")[0].splitlines() or [type(e).__name__])[0][:200]
    if isinstance(e, KeyError) or not first or first.isdigit():  # torch's legacy reader on a file of other bytes
        first = "not a PyTorch file"
    return CheckpointLoadError(f"{what} {path} is truncated or corrupt ({first})")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint without executing pickled code, refusing one that is empty, truncated, not a
    mapping or not finite; errors name the file (and the tensor)."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointLoadError(f"checkpoint {path} is a directory, not a checkpoint file")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointLoadError(f"checkpoint {path} is empty (0 bytes)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # the unpickler refuses anything but tensors and plain containers
        raise unreadable_torch_file(path, e) from e
    if not isinstance(state, dict):
        raise CheckpointLoadError(f"checkpoint {path} holds a {type(state).__name__}, not a training state")
    bad = nonfinite_tensor(state)
    if bad:
        raise CheckpointLoadError(f"checkpoint {path} is not finite: {bad}")
    return state


def load_newest_intact(directory: str | Path,
                       map_location: str | torch.device = "cpu",
                       ) -> tuple[Path, dict[str, Any], list[tuple[Path, str]]] | None:
    """``(path, state, skipped)`` of the newest checkpoint in ``directory`` that loads; ``skipped`` holds
    ``(path, why)`` for each newer one passed over. ``None`` without checkpoints; if none loads, the
    :class:`CheckpointLoadError` lists them all."""
    skipped: list[tuple[Path, str]] = []
    for _, path in reversed(list_checkpoints(directory)):
        try:
            return path, load_checkpoint(path, map_location), skipped
        except (CheckpointLoadError, OSError) as e:
            skipped.append((path, str(e)))
    if skipped:
        raise CheckpointLoadError(f"no intact checkpoint in {directory}: " + "; ".join(why for _, why in skipped))
    return None


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (an exported EMA), refusing a corrupt or non-finite one; errors
    name the file (and the tensor)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors' own error type for a bad header, truncated data …
        raise CheckpointLoadError(f"weights file {path} is truncated or corrupt ({str(e).splitlines()[0][:200]})") from e
    bad = nonfinite_tensor(tensors)
    if bad:
        raise CheckpointLoadError(f"weights file {path} is not finite: {bad}")
    return tensors
