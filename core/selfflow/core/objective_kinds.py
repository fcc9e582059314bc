"""The objective kinds: each ``objective.kind`` is one :class:`ObjectiveKind` entry, not a set of flags.

An entry says how the noise plan draws the levels (whether Dual-Timestep masking applies, how the second
level ``s`` relates to ``t``, where the teacher looks) and which loss terms run (flow matching always; the
representation term against the EMA teacher, an external target, or none) with its default weight γ and
its distance (−cos, or L2 for the paper's ablation).
The built-ins below are registered in :mod:`selfflow.core.registry`; an ablation is a new entry, added with
:func:`~selfflow.core.registry.register_objective` or the ``selfflow.objectives`` entry-point group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch

from .dual_timestep import TEACHER_LEVELS, TeacherLevel
from .noise_plan import SecondLevel

Alignment = Literal["none", "teacher", "target"]
Distance = Literal["cosine", "l2"]


@dataclass(frozen=True)
class ObjectiveKind:
    """One objective.

    - ``masked``: Dual-Timestep masking with the modality's ratio ``R_M`` (False: ``R_M = 0``, every token at
      ``t``);
    - ``alignment``: the representation term's target — ``teacher`` (the EMA model at ``teacher_level``,
      stopped at its layer), ``target`` (``tokens.target``, an external encoder's features: REPA) or ``none``;
    - ``gamma``: its default weight γ;
    - ``teacher_level``: the teacher's default level, ``min_ts`` (``τ_min = min(t, s)``) or ``t``;
    - ``second_level``: a rule ``(t, s) → s`` replacing the independently drawn ``s`` (None: keep it);
    - ``distance``: the representation term per token, ``cosine`` (``−cos``, the paper's) or ``l2`` (the mean
      squared difference over channels, the paper's "L2 instead of cosine" ablation).
    """

    name: str
    summary: str
    masked: bool = True
    alignment: Alignment = "teacher"
    gamma: float = 0.8
    teacher_level: TeacherLevel = "min_ts"
    second_level: SecondLevel | None = None
    distance: Distance = "cosine"

    def __post_init__(self) -> None:
        """Refuse, naming the field, what would train another method without a word: a misspelt teacher level
        or alignment (``"min_st"`` put the teacher at ``t``), a negative γ, a ``second_level`` rule whose ``s``
        leaves [0, 1] or is not finite (tried on a grid of ``(t, s)`` here, so a run pays nothing per step)."""
        where = f"objective kind {self.name!r}"
        if not (isinstance(self.name, str) and self.name):
            raise ValueError(f"an objective kind needs a name (a non-empty str, its objective.kind), got {self.name!r}")
        if self.teacher_level not in TEACHER_LEVELS:
            raise ValueError(f"{where}: teacher_level must be one of {', '.join(TEACHER_LEVELS)}, "
                             f"got {self.teacher_level!r}")
        if self.alignment not in get_args(Alignment):
            raise ValueError(f"{where}: alignment must be one of {', '.join(get_args(Alignment))}, "
                             f"got {self.alignment!r}")
        if self.distance not in get_args(Distance):
            raise ValueError(f"{where}: distance must be one of {', '.join(get_args(Distance))}, "
                             f"got {self.distance!r}")
        if isinstance(self.gamma, bool) or not isinstance(self.gamma, (int, float)) or not self.gamma >= 0:
            raise ValueError(f"{where}: gamma (the representation loss's default weight) must be a number >= 0, "
                             f"got {self.gamma!r}")
        if self.second_level is not None:
            grid = torch.linspace(0.0, 1.0, 11)
            t, s = grid.repeat_interleave(11).view(11, 11), grid.repeat(11).view(11, 11)  # every (t, s) pair
            try:
                out = self.second_level(t, s)
            except Exception as e:
                raise ValueError(f"{where}: its second_level rule failed on (t, s) tensors of shape (11, 11): "
                                 f"{type(e).__name__}: {e}") from e
            if not (isinstance(out, torch.Tensor) and out.shape == s.shape and out.is_floating_point()):
                got = f"{tuple(out.shape)} {out.dtype}" if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(f"{where}: its second_level rule must return s as t and s come, a float tensor "
                                 f"(11, 11); got {got}")
            if not (out.isfinite().all() and (out >= 0).all() and (out <= 1).all()):
                raise ValueError(f"{where}: its second_level rule must keep s in [0, 1] (a noise level); on t, s "
                                 f"in [0, 1] it gave values in [{out.min().item():g}, {out.max().item():g}]")


@dataclass(frozen=True)
class SlightlyCleaner:
    """``s = max(t − gap, 0)``: the second level only slightly cleaner than the first.

    The paper's ablation ("s only slightly cleaner than t", §5.4: about as bad as no masking) constrains
    the second timestep to lie just below ``t``; its exact formula is not in our sources, so this is our
    parameterisation: a fixed gap in time, clipped at the data end. The masked tokens then differ from the
    others by ``gap`` only, and the teacher (at ``τ_min = s``) sees a view barely cleaner than the student's.
    """

    gap: float = 0.1

    def __call__(self, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return (t - self.gap).clamp(min=0.0)


BUILTIN_OBJECTIVES: tuple[ObjectiveKind, ...] = (
    ObjectiveKind("self_flow", "Dual-Timestep Scheduling + self-distillation (R_M from the modality, γ 0.8)"),
    ObjectiveKind("flow_matching", "vanilla rectified flow (no mask, no representation loss)",
                  masked=False, alignment="none", gamma=0.0),
    # SRA's no-mask variant: the teacher sees the student's own level t (not min(t, s) of an unused s).
    ObjectiveKind("self_flow_no_mask", "ablation: representation loss without masking (teacher at t)",
                  masked=False, teacher_level="t"),
    ObjectiveKind("self_flow_no_rep", "ablation: Dual-Timestep Scheduling without the representation loss",
                  alignment="none", gamma=0.0),
    ObjectiveKind("self_flow_slightly_cleaner", "ablation: masked tokens at s = max(t − 0.1, 0), only "
                  "slightly cleaner than t", second_level=SlightlyCleaner(0.1)),
    # The paper's L2 ablation; its exact form is not in our sources: the per-token mean over channels of the
    # squared difference between the projected student features and the teacher's raw hidden states.
    ObjectiveKind("self_flow_l2", "ablation: the representation loss as an L2 distance instead of −cos",
                  distance="l2"),
    ObjectiveKind("repa", "flow matching + γ·(−cos(proj(h_l), tokens.target)), γ 0.5",
                  masked=False, alignment="target", gamma=0.5),
)
