"""Which modality trains at each step of a mixed run.

The paper trains one modality per mini-batch, drawn with fixed probabilities (image 57 %, video 30 %,
audio 13 %). The draw comes from a dedicated generator with the same seed on every rank, so all ranks
train the same modality at every step (their collectives stay matched) and the sequence is part of the
checkpointed state.
"""

from __future__ import annotations

from typing import Any

import torch


class ModalitySchedule:
    """Seeded categorical draw over modality names; ``next()`` gives the modality of the next step."""

    def __init__(self, weights: dict[str, float], seed: int):
        if not weights:
            raise ValueError("a modality mixture needs at least one modality")
        bad = {k: w for k, w in weights.items() if not w > 0}
        if bad:
            raise ValueError(f"mixture weights must be positive; got {bad}")
        self.names = list(weights)
        total = sum(weights.values())
        self.probs = torch.tensor([weights[n] / total for n in self.names], dtype=torch.float64)
        self.generator = torch.Generator().manual_seed(seed)
        self.counts = dict.fromkeys(self.names, 0)

    def next(self) -> str:
        if len(self.names) == 1:
            name = self.names[0]
        else:
            name = self.names[int(torch.multinomial(self.probs, 1, generator=self.generator))]
        self.counts[name] += 1
        return name

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "counts": dict(self.counts), "names": self.names}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["names"]) != self.names:
            raise ValueError(f"cannot resume the modality schedule: it was over {state['names']}, "
                             f"the config now names {self.names}")
        self.generator.set_state(state["generator"])
        self.counts = dict(state["counts"])
