"""Token groups: a modality's hook to shape the per-token noise schedule and the loss weights.

Some modalities pack tokens of different roles into one sequence — a robot policy's video frames and
action chunk, say. A plain mean over tokens lets the many video tokens swamp the few action tokens, and
one timestep per sample cannot express the schedules joint video–action models train with (UWM,
VideoVLA). A modality opts in with two methods (:meth:`Modality.token_groups`, :meth:`Modality.token_schedule`):

- ``token_groups(tokens) → (L,) long``: each token's group, an index into ``schedule.groups``;
- ``token_schedule() →`` :class:`TokenSchedule`: the groups (name, loss weight, whether Self-Flow's
  masking and representation loss apply, an optional own timestep distribution) and the *modes*, each
  with a probability and a rule per group.

Per sample the objective draws a mode (from the step generator, for the global batch, then sliced — the
same rank/resume invariance as :class:`~selfflow.core.noise_plan.StepNoise`) and applies it **after**
Dual-Timestep Scheduling. A group's rule says where its tokens' level comes from (time convention: t = 0
data, t = 1 noise):

============  ==========================================================================================
``own``       a Self-Flow group: ``t`` (masked tokens ``s``, Dual-Timestep Scheduling); other groups: their
              own level ``t_g``, drawn independently per sample from ``group.timesteps``
``shared``    the sample's ``t`` (a Self-Flow group's masked tokens keep ``s``)
``noise``     t = 1, pure noise, no loss (the group is marginalised out: predicted without it)
``clean``     t = 0, the data itself, no loss (the group conditions the others)
============  ==========================================================================================

Losses are averaged **per group** over the loss-carrying tokens of the global batch (tokens × the group's
content ``channels``: padding to a common width is neither noised nor in the mean), then
combined: ``loss_fm = Σ_g w_g · mean_g``. The dict also holds each group's unweighted ``loss_fm_<name>``.
The representation loss covers loss-carrying tokens of Self-Flow groups only. The EMA teacher sees those
tokens at ``τ_min = min(t, s)`` (or at ``t``: the objective's ``teacher_level``) and **every other token at
the student's own level**: a cleaner view of the video is the distillation target, while a cleaner view of,
e.g., the actions would hand the teacher information the student cannot recover (and the actions have
their own flow-matching loss).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch

from .dual_timestep import DualTimesteps, TeacherLevel
from .modulation import TokenTimesteps
from .timesteps import TimestepDistribution

Rule = Literal["own", "shared", "noise", "clean"]
RULES: tuple[str, ...] = ("own", "shared", "noise", "clean")
# Fixed columns of the per-sample level table; groups' own levels follow.
T, S, CLEAN, NOISE, TAU_MIN = range(5)


@dataclass(frozen=True)
class TokenGroup:
    """One role of tokens: ``loss_weight`` ``w_g`` of its per-group mean; ``self_flow``: Dual-Timestep masking
    and the representation loss apply to it; ``timesteps``: its ``own`` level's distribution (None: the
    objective's); ``channels``: the first ``channels`` channels of its tokens are its content (None: all) —
    for tokens padded to a sequence's common width. Only content is noised and carries loss; the other
    channels (zero padding, a type flag) reach the student as given at every level, so a 7-D action in a
    200-channel token is not drowned by 193 channels of pure noise."""

    name: str
    loss_weight: float = 1.0
    self_flow: bool = False
    timesteps: TimestepDistribution | None = None
    channels: int | None = None


@dataclass(frozen=True)
class ScheduleMode:
    """A way to noise one sample: drawn with ``probability`` (normalised over the modes); ``rules`` maps group
    names to a :data:`Rule` (groups not named: ``own``)."""

    name: str
    probability: float
    rules: Mapping[str, Rule] = field(default_factory=dict)

    def rule(self, group: str) -> str:
        return self.rules.get(group, "own")


@dataclass(frozen=True)
class TokenSchedule:
    """Groups and modes; see the module docstring."""

    groups: tuple[TokenGroup, ...]
    modes: tuple[ScheduleMode, ...]

    def __post_init__(self) -> None:
        names = [g.name for g in self.groups]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"token groups need unique names, got {names}")
        if not self.modes or any(m.probability < 0 for m in self.modes) or sum(m.probability for m in self.modes) <= 0:
            raise ValueError(f"schedule modes need probabilities ≥ 0 with a positive sum: {self.modes}")
        for m in self.modes:
            for g, r in m.rules.items():
                if g not in names or r not in RULES:
                    raise ValueError(f"mode {m.name!r}: rule {g!r}: {r!r} — groups are {names}, rules {RULES}")

    def channel_mask(self, groups: torch.Tensor, width: int) -> torch.Tensor | None:
        """``(L, C)`` bool of the loss-carrying channels, or ``None`` when every group uses all ``width``."""
        counts = [width if g.channels is None else g.channels for g in self.groups]
        if any(not 0 < c <= width for c in counts):
            raise ValueError(f"token group channels {counts} must lie in 1..{width} (the token width)")
        if all(c == width for c in counts):
            return None
        per_token = torch.tensor(counts, device=groups.device)[groups.long()]  # (L,)
        return torch.arange(width, device=groups.device)[None, :] < per_token[:, None]

    def eligible(self, groups: torch.Tensor) -> torch.Tensor:
        """``(L,)`` bool: tokens of Self-Flow groups, the only ones Dual-Timestep masking may pick."""
        return torch.tensor([g.self_flow for g in self.groups], device=groups.device)[groups.long()]

    @property
    def own_groups(self) -> tuple[TokenGroup, ...]:
        """Groups that draw a level of their own (non-Self-Flow groups with an ``own`` rule in some mode)."""
        return tuple(g for g in self.groups
                     if not g.self_flow and any(m.rule(g.name) == "own" for m in self.modes))

    def tables(self) -> dict[str, torch.Tensor]:
        """``(M, G)`` tables: level column, +1 where masked (``s``), flow-matching loss and rep-loss carriers."""
        own = {g.name: 5 + j for j, g in enumerate(self.own_groups)}
        level, dual, fm, rep = [], [], [], []
        for m in self.modes:
            rows = [[], [], [], []]
            for g in self.groups:
                r = m.rule(g.name)
                live = r in ("own", "shared")
                col = {"noise": NOISE, "clean": CLEAN}.get(r, T if g.self_flow or r == "shared" else own.get(g.name))
                for row, v in zip(rows, (col, live and g.self_flow, live and g.loss_weight > 0, live and g.self_flow)):
                    row.append(v)
            for out, row in zip((level, dual, fm, rep), rows):
                out.append(row)
        return {"level": torch.tensor(level, dtype=torch.long), "dual": torch.tensor(dual, dtype=torch.bool),
                "fm": torch.tensor(fm, dtype=torch.bool), "rep": torch.tensor(rep, dtype=torch.bool)}


@dataclass
class ScheduledLevels:
    """One step's per-token levels and loss weights for this rank's slice ``(B, L)``.

    ``fm_weight`` and ``rep_weight`` already hold ``w_g / count_g`` of the *global* batch times the number of
    slices, so ``Σ weight · err`` on every slice, averaged over slices (DDP and gradient accumulation do
    that), is the global per-group mean; ``group_weight`` is the same per group without ``w_g`` (for the
    groups that carry loss in some mode). A group without loss-carrying tokens in a step logs 0.
    """

    student: TokenTimesteps
    teacher: TokenTimesteps
    fm_weight: torch.Tensor  # (B, L)
    rep_weight: torch.Tensor  # (B, L)
    group_weight: dict[str, torch.Tensor]  # name → (B, L)
    modes: torch.Tensor  # (B,) long, index into schedule.modes


def draw_modes(schedule: TokenSchedule, n: int, generator: torch.Generator | None,
               device: torch.device | str) -> torch.Tensor:
    """``(n,)`` mode indices drawn with the modes' probabilities (one uniform per sample)."""
    p = torch.tensor([m.probability for m in schedule.modes], dtype=torch.float64)
    edges = (p.cumsum(0) / p.sum())[:-1].to(device=device, dtype=torch.float32)
    u = torch.rand(n, generator=generator, device=device)
    return torch.bucketize(u, edges, right=True)


def schedule_levels(schedule: TokenSchedule, groups: torch.Tensor, dual: DualTimesteps,
                    default_timesteps: TimestepDistribution, generator: torch.Generator | None,
                    shard: tuple[int, int] = (0, 1), teacher_level: TeacherLevel = "min_ts") -> ScheduledLevels:
    """Apply ``schedule`` after Dual-Timestep Scheduling: ``groups (L,)`` long, ``dual`` this rank's slice;
    ``teacher_level``: the teacher's level on representation tokens (``τ_min`` or ``t``).

    Draws, for the global batch ``world × B``: one mode per sample, then each non-Self-Flow group's own level.
    """
    rank, world = shard
    b, length = dual.mask.shape
    device = dual.t.device
    layout = groups.detach().to("cpu", torch.long)  # (L,): the layout's bookkeeping stays on the host
    if layout.shape != (length,) or int(layout.min()) < 0 or int(layout.max()) >= len(schedule.groups):
        raise ValueError(f"token_groups must be (L,) = ({length},) indices into {len(schedule.groups)} groups; "
                         f"got shape {tuple(groups.shape)}")
    groups = layout.to(device)
    host_tab = schedule.tables()
    g = b * world
    modes_all = draw_modes(schedule, g, generator, device)  # (world·B,)
    own = [(gr.timesteps or default_timesteps).sample(g, generator, device) for gr in schedule.own_groups]
    sl = slice(rank * b, (rank + 1) * b)
    modes = modes_all[sl]
    tab = {k: v.to(device) for k, v in host_tab.items()}
    t, s = dual.t.float(), dual.s.float()
    values = torch.stack([t, s, torch.zeros_like(t), torch.ones_like(t), torch.minimum(t, s),
                          *[o[sl] for o in own]], 1)  # (B, K)
    level = tab["level"][modes[:, None], groups[None, :]]  # (B, L)
    student_idx = level + (dual.mask & tab["dual"][modes[:, None], groups[None, :]]).long()
    rep_tok = tab["rep"][modes[:, None], groups[None, :]]  # (B, L) bool
    teacher_idx = torch.where(rep_tok, TAU_MIN if teacher_level == "min_ts" else T, student_idx)

    # Global token counts per group (from the global modes: no collective needed).
    per_group = torch.bincount(layout, minlength=len(schedule.groups)).float().to(device)  # (G,) per sample
    fm_count = (tab["fm"][modes_all].float() * per_group).sum(0)  # (G,)
    rep_count = (tab["rep"][modes_all].float() * per_group).sum()  # () — tensors: no device sync
    fm_tok = tab["fm"][modes[:, None], groups[None, :]].float()  # (B, L)
    scale = world / fm_count.clamp(min=1)  # (G,)
    group_weight = {gr.name: fm_tok * (groups == j).float()[None] * scale[j] for j, gr in enumerate(schedule.groups)
                    if bool(host_tab["fm"][:, j].any())}  # groups that never carry loss (a clean context) log nothing
    w = torch.tensor([gr.loss_weight for gr in schedule.groups], device=device)
    fm_weight = fm_tok * (w * scale)[groups][None]
    rep_weight = rep_tok.float() * (world / rep_count.clamp(min=1))
    return ScheduledLevels(student=TokenTimesteps.from_levels(values, student_idx),
                           teacher=TokenTimesteps.from_levels(values, teacher_idx), fm_weight=fm_weight,
                           rep_weight=rep_weight, group_weight=group_weight, modes=modes)
