"""An objective plug-in that lives outside core: Self-Flow whose masked tokens are always the noisier ones.

Dual-Timestep Scheduling draws ``t`` and ``s`` independently, so half the time the masked tokens are the
cleaner view. This kind sets ``s ← max(t, s)``: the masked tokens are never cleaner than the rest, and the
teacher (at ``τ_min = min(t, s) = t``) sees every token at the unmasked level. A package exposes it with an
entry point, e.g. in its ``pyproject.toml``::

    [project.entry-points."selfflow.objectives"]
    self_flow_noisier_mask = "noisier_mask_objective:NOISIER_MASK"

after which ``--set objective.kind=self_flow_noisier_mask`` trains with it; no edit in core.
"""

from __future__ import annotations

import torch

from selfflow.core.objective_kinds import ObjectiveKind


def noisier_second_level(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``(B,)`` → ``(B,)``: the masked tokens' level, never below the others' ``t``."""
    return torch.maximum(t, s)


NOISIER_MASK = ObjectiveKind("self_flow_noisier_mask", "Self-Flow with the masked tokens never the cleaner ones",
                             second_level=noisier_second_level)
