"""A deterministic, resumable stream over an indexable synthetic dataset (any modality).

Rank ``r``'s step ``n`` renders global indices ``[n·B·W + r·B, … + B)``: one rank and N ranks see the same
global batches, and the position is one integer. Every built-in synthetic dataset (shapes, moving shapes,
chords, fake RT-1 frames) streams through it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from ..modality import Batch, DataStream


class IndexedStream(DataStream):
    """``render(range_of_global_indices) → batch``, called for this rank's slice of each global batch."""

    def __init__(self, render: Callable[[range], Batch], batch_size: int, rank: int = 0, world_size: int = 1):
        self.render, self.batch_size, self.rank, self.world_size = render, batch_size, rank, world_size
        self.step = 0

    def __iter__(self) -> Iterator[Batch]:
        while True:
            start = (self.step * self.world_size + self.rank) * self.batch_size
            batch = self.render(range(start, start + self.batch_size))
            self.step += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "batch_size": self.batch_size, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the same sample on any split: the stream is one global sequence, so only the number of
        samples consumed matters (a run with the same global batch over other ranks × micro-batches ×
        accumulation steps always divides it)."""
        consumed = int(state["step"]) * state["batch_size"] * state["world_size"]
        per_step = self.batch_size * self.world_size
        if consumed % per_step:
            raise ValueError(f"cannot resume the synthetic stream: it stopped after {consumed} samples, which is "
                             f"not a whole number of micro-batches × ranks = {self.batch_size} × "
                             f"{self.world_size} (was {state['batch_size']} × {state['world_size']})")
        self.step = consumed // per_step
