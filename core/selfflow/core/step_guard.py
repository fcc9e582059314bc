"""The step guard: the trainer's policies for non-finite steps and corrupt data.

A step whose loss or gradient norm is not finite is skipped (its gradients dropped); too many in a row stop
the run. Corrupt samples the data streams skipped are counted against the samples trained on; too large a
fraction stops the run. Every rank sees the same reduced numbers, so all ranks decide alike.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from . import faults
from .checkpoint import latest_checkpoint
from .config import TrainConfig


class NonFiniteLossError(faults.RunStopped):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


class BadDataError(faults.RunStopped):
    """Too large a fraction of the samples read were corrupt (``train.max_bad_data_fraction``)."""


# The bad-data fraction is only judged after this many samples: a few early corrupt ones are not a trend.
MIN_SAMPLES_FOR_BAD_FRACTION = 64


class StepGuard:
    """Counts skipped steps, the non-finite ones in a row and samples trained on (all checkpointed: a resumed
    run stops where the uninterrupted one would) and stops the run when a limit of
    ``train`` is crossed; error messages name the last good checkpoint in ``ckpt_dir``."""

    def __init__(self, cfg: TrainConfig, ckpt_dir: Path):
        self.max_nonfinite_steps = cfg.max_nonfinite_steps
        self.max_bad_data_fraction = cfg.max_bad_data_fraction
        self.ckpt_dir = ckpt_dir
        self.skipped_steps = 0
        self.data_samples = 0  # samples trained on (global), for the bad-data fraction
        self.nonfinite_in_a_row = 0

    def check_data(self, samples: int, skipped: int, step: int) -> None:
        """Count ``samples`` trained on; stop when more than ``train.max_bad_data_fraction`` of all samples
        read were corrupt (``skipped``: cumulative, summed over ranks)."""
        self.data_samples += samples
        seen = self.data_samples + skipped
        limit = self.max_bad_data_fraction
        if seen >= MIN_SAMPLES_FOR_BAD_FRACTION and skipped > limit * seen:
            raise BadDataError(
                f"{skipped} of {seen} samples read so far were corrupt and skipped ({skipped / seen:.1%} > "
                f"train.max_bad_data_fraction={limit}) at step {step}; stopping. The warnings of "
                f"selfflow.shards name each bad shard and key; the last good checkpoint is {self._last()}.")

    def accept(self, loss: float, grad_norm: float, step: int) -> bool:
        """Whether the optimizer may step; ``False`` skips a non-finite step, and the
        ``train.max_nonfinite_steps``-th in a row raises :class:`NonFiniteLossError`."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.nonfinite_in_a_row = 0
            return True
        self.skipped_steps += 1
        self.nonfinite_in_a_row += 1
        if self.nonfinite_in_a_row >= self.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"{self.nonfinite_in_a_row} optimizer steps in a row had a non-finite loss or gradient "
                f"(at step {step}); stopping. The last good checkpoint is {self._last()}. "
                "Lower optim.lr, check the data, or raise train.max_nonfinite_steps.")
        return False

    def _last(self) -> Path | str:
        return latest_checkpoint(self.ckpt_dir) or "none"

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps, "data_samples": self.data_samples,
                "nonfinite_in_a_row": self.nonfinite_in_a_row}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped_steps = int(state["skipped_steps"])
        self.data_samples = int(state["data_samples"])
        self.nonfinite_in_a_row = int(state.get("nonfinite_in_a_row", 0))  # (older checkpoints lack it)
