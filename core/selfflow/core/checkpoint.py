"""Checkpoints: one file per step holding the full training state, written atomically.

A checkpoint is written to ``<name>.tmp`` then renamed, so a crash mid-write never leaves a file that
looks complete; only ``step_XXXXXXXX.pt`` files are ever loaded, always with ``weights_only=True`` (no
pickled code runs). Older checkpoints beyond ``keep_last`` are deleted after a successful write. A failed
write (a full disk) removes its temporary file, leaves the previous checkpoints alone and raises
:class:`CheckpointWriteError`, which stops the run with a message naming both files.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from . import faults

_NAME = re.compile(r"^step_(\d{8})\.pt$")


class CheckpointWriteError(faults.RunStopped):
    """Writing a checkpoint failed (e.g. no space left); the previous checkpoints are intact."""


class CheckpointLoadError(ValueError):
    """A checkpoint cannot be loaded safely (it holds pickled code, or it is not a checkpoint)."""


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


def save_checkpoint(state: dict[str, Any], directory: str | Path, step: int, keep_last: int = 2) -> Path:
    """Atomically write ``state`` as step ``step``; prune to the newest ``keep_last``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(d, step)
    tmp = final.with_name(final.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            faults.save_delay(step)  # fault hooks: no-ops unless their env variable is set
            faults.save_enospc(step)
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError | RuntimeError) and not isinstance(e, faults.RunStopped):
            previous = latest_checkpoint(d)
            raise CheckpointWriteError(
                f"cannot write checkpoint {final}: {e}. The previous checkpoint "
                f"{previous or '(none)'} is intact; free space (or fix the error) and run the same command "
                "again to resume from it.") from e
        raise
    for _, old in list_checkpoints(d)[:-keep_last]:
        old.unlink(missing_ok=True)
    for stale in d.glob("step_*.pt.tmp"):  # left by a process killed mid-write
        stale.unlink(missing_ok=True)
    return final


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint without executing pickled code; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # the unpickler refuses anything but tensors and plain containers
        raise CheckpointLoadError(f"cannot load checkpoint {path} safely (weights_only=True): {e}") from e
