"""Noise plans: how one step noises a batch for the student and the teacher, and how tokens weigh in the loss.

Every objective runs the same loop (:meth:`~selfflow.core.objective.ResolvedObjective.loss`); what differs
between a plain batch and a modality with token groups is the *plan* that draws the step's randomness and
turns it into a :class:`NoisedView`:

- :class:`DualTimestepPlan`: Dual-Timestep Scheduling over all tokens (mask ratio 0: plain flow matching,
  one level ``t`` per sample); losses are plain means over tokens.
- :class:`TokenSchedulePlan`: the same draw, then the modality's
  :class:`~selfflow.core.token_schedule.TokenSchedule` (per-sample modes, per-group loss weights).

The draws (their order and count on the step generator) are those of :meth:`StepNoise.draw`, followed, under
a token schedule, by :func:`~selfflow.core.token_schedule.schedule_levels`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from .dual_timestep import DualTimesteps, TeacherLevel, sample_dual_timesteps
from .modulation import TokenTimesteps
from .timesteps import TimestepDistribution, interpolate
from .token_schedule import TokenSchedule, schedule_levels

SecondLevel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (t, s drawn) (B,) → the s to use (B,)


class NoiseSettings(Protocol):
    """What a plan reads from the resolved objective."""

    label_dropout: float
    mask_ratio: float
    timesteps: TimestepDistribution
    teacher_level: TeacherLevel
    second_level: SecondLevel | None


@dataclass
class StepNoise:
    """Everything random in one step for a batch: noise, the two levels, the mask and label dropout."""

    noise: torch.Tensor  # (B, L, C)
    dual: DualTimesteps
    drop: torch.Tensor  # (B,) bool

    @classmethod
    def draw(cls, shape: tuple[int, int, int], obj: NoiseSettings, generator: torch.Generator | None,
             device: torch.device | str, dtype: torch.dtype = torch.float32,
             shard: tuple[int, int] = (0, 1), eligible: torch.Tensor | None = None) -> StepNoise:
        """Draw for the *global* batch ``world × B`` and keep rank ``r``'s slice, so a sample's noise does
        not depend on how many ranks share the batch (1 rank and N ranks train on the same numbers).
        ``eligible (L,)`` bool: the tokens the mask may pick (None: all). An objective's ``second_level``
        rule replaces the drawn ``s`` (after the draw, so the generator advances the same either way)."""
        rank, world = shard
        b, length, ch = shape
        g = b * world
        drop = torch.rand(g, generator=generator, device=device) < obj.label_dropout
        noise = torch.randn((g, length, ch), generator=generator, device=device, dtype=dtype)
        dual = sample_dual_timesteps(g, length, obj.timesteps, obj.mask_ratio, generator, device, eligible)
        sl = slice(rank * b, (rank + 1) * b)
        s = dual.s if obj.second_level is None else obj.second_level(dual.t, dual.s)
        if not (isinstance(s, torch.Tensor) and s.shape == dual.s.shape and s.is_floating_point()):
            got = f"{tuple(s.shape)} {s.dtype}" if isinstance(s, torch.Tensor) else type(s).__name__
            raise ValueError(f"the objective's second_level rule must return s as t and s come, a float tensor "
                             f"{tuple(dual.s.shape)}; got {got}")
        return cls(noise=noise[sl], dual=DualTimesteps(dual.t[sl], s[sl], dual.mask[sl]), drop=drop[sl])


@dataclass
class Levels:
    """One forward's noise levels: ``dense`` ``(B,)`` or ``(B, L)`` to noise the input with, ``model`` as the
    backbone takes them (``(B,)`` or :class:`TokenTimesteps`)."""

    dense: torch.Tensor
    model: torch.Tensor | TokenTimesteps


@dataclass
class NoisedView:
    """One step's noise, levels and loss weights for this rank's slice.

    ``fm_weight``/``rep_weight (B, L)`` are per-token weights whose weighted *sum* is the loss (None: a plain
    mean over tokens and channels); ``channels (L, C)`` bool marks the content channels (None: all);
    ``group_weight`` maps a token group to its weights for the logged ``loss_fm_<group>``.
    """

    noise: torch.Tensor  # (B, L, C)
    drop: torch.Tensor  # (B,) bool
    student: Levels
    teacher: Levels
    fm_weight: torch.Tensor | None = None
    rep_weight: torch.Tensor | None = None
    channels: torch.Tensor | None = None
    group_weight: dict[str, torch.Tensor] = field(default_factory=dict)

    def noised(self, x0: torch.Tensor, levels: Levels) -> torch.Tensor:
        """``x0 (B, L, C)`` at ``levels``; channels outside the content keep their data values."""
        x_t = interpolate(x0, self.noise, levels.dense)
        return x_t if self.channels is None else torch.where(self.channels, x_t, x0)


class NoisePlan(Protocol):
    def draw(self, x0: torch.Tensor, obj: NoiseSettings, generator: torch.Generator | None,
             shard: tuple[int, int]) -> NoisedView: ...


class DualTimestepPlan:
    """Dual-Timestep Scheduling over every token; plain means over tokens."""

    def draw(self, x0: torch.Tensor, obj: NoiseSettings, generator: torch.Generator | None,
             shard: tuple[int, int]) -> NoisedView:
        rnd = StepNoise.draw(tuple(x0.shape), obj, generator, x0.device, x0.dtype, shard)
        dual = rnd.dual
        # Without a mask every token has level t: the (B,) path broadcasts the modulation instead of gathering.
        student = Levels(dual.tau, dual.token_timesteps() if obj.mask_ratio > 0 else dual.t)
        teacher_t = dual.teacher_level(obj.teacher_level)
        return NoisedView(noise=rnd.noise, drop=rnd.drop, student=student, teacher=Levels(teacher_t, teacher_t))


@dataclass(frozen=True)
class TokenSchedulePlan:
    """Dual-Timestep Scheduling, then the modality's token schedule over its token ``groups (L,)``."""

    schedule: TokenSchedule
    groups: torch.Tensor

    def draw(self, x0: torch.Tensor, obj: NoiseSettings, generator: torch.Generator | None,
             shard: tuple[int, int]) -> NoisedView:
        groups = self.groups.to(x0.device)
        rnd = StepNoise.draw(tuple(x0.shape), obj, generator, x0.device, x0.dtype, shard,
                             eligible=self.schedule.eligible(groups.cpu()))
        lv = schedule_levels(self.schedule, groups, rnd.dual, obj.timesteps, generator, shard, obj.teacher_level)
        return NoisedView(noise=rnd.noise, drop=rnd.drop, student=Levels(lv.student.dense(), lv.student),
                          teacher=Levels(lv.teacher.dense(), lv.teacher), fm_weight=lv.fm_weight,
                          rep_weight=lv.rep_weight, channels=self.schedule.channel_mask(groups, x0.shape[-1]),
                          group_weight=lv.group_weight)


def plan_for(schedule: TokenSchedule | None, groups: torch.Tensor | None) -> NoisePlan:
    """The token-schedule plan when a modality gives both a schedule and its token groups, else the plain one."""
    if schedule is not None and groups is not None:
        return TokenSchedulePlan(schedule, groups)
    return DualTimestepPlan()
