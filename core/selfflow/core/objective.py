"""The objective: a config, its resolved form, and the one training loop every kind runs.

``loss = MSE(v̂, ε − x0) + γ·(−cos(proj(h_l^student), h_k^target))`` over data tokens, in fp32. A *noise plan*
(:mod:`selfflow.core.noise_plan`) draws the step's noise and levels — Dual-Timestep Scheduling, optionally
followed by a modality's token schedule — and the per-token loss weights; the *loss terms*
(:mod:`selfflow.core.loss_terms`) are flow matching and representation alignment against the EMA teacher
(seeing the batch at its level, run only up to block ``k``, without gradients) or against an external
encoder's per-token features (``tokens.target``, REPA: computed by the modality, so core never imports the
encoder's library). Which plan settings and terms a run uses is its ``objective.kind``, an entry of
:mod:`selfflow.core.objective_kinds` looked up through :mod:`selfflow.core.registry`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from torch import nn

from .backbone_protocol import captured
from .dual_timestep import TeacherLevel
from .loss_terms import alignment_loss, flow_matching_loss, teacher_features
from .noise_plan import SecondLevel, plan_for
from .objective_kinds import ObjectiveKind
from .registry import get_objective
from .timesteps import TimestepDistribution, target_velocity
from .token_schedule import TokenSchedule
from .tokens import Conditioning, Tokens

# Validation context key (``RunConfig.model_validate(raw, context={UNKNOWN_KIND_OK: True})``): the config of a
# trained model loaded to sample, evaluate or export, which never runs its objective, so a plug-in kind that is
# not installed here is accepted (training, and resuming, still refuse it).
UNKNOWN_KIND_OK = "unknown_objective_kind_ok"


class ObjectiveConfig(BaseModel):
    """Which objective to train. ``kind`` picks a registered :class:`ObjectiveKind`; explicit keys override
    its defaults. Built-in kinds: ``self_flow``, ``flow_matching``, ``self_flow_no_mask``, ``self_flow_no_rep``,
    ``self_flow_slightly_cleaner``, ``self_flow_l2``, ``repa`` (see :mod:`selfflow.core.objective_kinds`).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)  # as the other run config sections

    kind: str = Field("self_flow", description="a registered objective kind (plug-ins: 'selfflow.objectives')")
    mask_ratio: float | None = Field(None, ge=0, le=1, description="None: the modality's default R_M")
    gamma: float | None = Field(None, ge=0, description="representation-loss weight (None: the kind's; repa 0.5)")
    teacher_level: TeacherLevel | None = Field(
        None, description="the teacher's level: min_ts = min(t, s), t = the student's unmasked level "
                          "(None: the kind's; self_flow_no_mask: t, as SRA)")
    student_layer: int | None = Field(None, ge=1, description="None: round(0.3·depth) (paper: 8)")
    teacher_layer: int | None = Field(None, ge=1, description="None: round(0.7·depth) (paper: 20)")
    label_dropout: float = Field(0.1, ge=0, le=1, description="labels → null label, for CFG")
    timesteps: TimestepDistribution | None = Field(None, description="None: the modality's default")

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, kind: str, info: ValidationInfo) -> str:
        try:
            get_objective(kind)
        except KeyError as err:
            if not (info.context or {}).get(UNKNOWN_KIND_OK):
                raise ValueError(err.args[0]) from None
        return kind

    def resolve(self, depth: int, default_mask_ratio: float,
                default_timesteps: TimestepDistribution) -> ResolvedObjective:
        """Fill every default for a model of ``depth`` blocks and a modality's defaults."""
        kind = get_objective(self.kind)
        mask_ratio = (default_mask_ratio if self.mask_ratio is None else self.mask_ratio) if kind.masked else 0.0
        gamma = 0.0 if kind.alignment == "none" else kind.gamma if self.gamma is None else self.gamma
        student = self.student_layer or max(1, round(0.3 * depth))
        teacher = self.teacher_layer or max(1, round(0.7 * depth))
        for name, layer in (("student_layer", student), ("teacher_layer", teacher)):
            if layer > depth:
                raise ValueError(f"objective.{name} = {layer} but the model has only {depth} blocks")
        if student >= teacher and gamma > 0 and kind.alignment == "teacher":
            # Not an error: an experiment may try it. Python shows an identical warning once, so a mixture
            # resolving this objective for each modality still warns once.
            warnings.warn(f"objective.student_layer = {student} is at or deeper than objective.teacher_layer = "
                          f"{teacher} (of {depth} blocks): Self-Flow aligns an early student block to a deeper "
                          "teacher block",
                          UserWarning, stacklevel=2)
        return ResolvedObjective(mask_ratio=mask_ratio, gamma=gamma, student_layer=student,
                                 teacher_layer=teacher, label_dropout=self.label_dropout,
                                 timesteps=self.timesteps or default_timesteps, kind=kind,
                                 teacher_level=self.teacher_level or kind.teacher_level)


@dataclass(frozen=True)
class ResolvedObjective:
    """An objective with every default filled, for one modality; :meth:`loss` runs it on a batch."""

    mask_ratio: float
    gamma: float
    student_layer: int
    teacher_layer: int
    label_dropout: float
    timesteps: TimestepDistribution
    kind: ObjectiveKind
    teacher_level: TeacherLevel = "min_ts"

    def settings(self) -> dict[str, Any]:
        """What every default resolved to, as JSON values: a resume compares them, so that a key set to its
        default value (``objective.gamma: 0.8`` where the kind's is 0.8) is the same objective as the key unset."""
        return {"kind": self.kind.name, "mask_ratio": self.mask_ratio, "gamma": self.gamma,
                "student_layer": self.student_layer, "teacher_layer": self.teacher_layer,
                "label_dropout": self.label_dropout, "teacher_level": self.teacher_level,
                "timesteps": self.timesteps.model_dump(mode="json")}

    @property
    def uses_teacher(self) -> bool:
        return self.gamma > 0 and self.kind.alignment == "teacher"

    @property
    def uses_projector(self) -> bool:
        return self.gamma > 0

    @property
    def second_level(self) -> SecondLevel | None:
        return self.kind.second_level

    def loss(self, student: nn.Module, teacher: nn.Module | None, tokens: Tokens, cond: Conditioning, *,
             null_label: int, modality: str | None, generator: torch.Generator | None,
             shard: tuple[int, int] = (0, 1), schedule: TokenSchedule | None = None,
             groups: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Losses for one batch: ``loss`` (to minimise), ``loss_fm``, ``loss_rep`` (0 when γ = 0).

        ``shard = (rank, world)`` says which slice of the global batch this is (see
        :meth:`~selfflow.core.noise_plan.StepNoise.draw`). ``schedule`` and ``groups (L,)`` (the modality's
        :meth:`~selfflow.core.modality.Modality.token_schedule` and
        :meth:`~selfflow.core.modality.Modality.token_groups`) switch to the token-schedule plan: per-group
        schedules and loss means, adding ``loss_fm_<group>`` to the dict.
        """
        x0 = tokens.x
        view = plan_for(schedule, groups).draw(x0, self, generator, shard)
        cond = drop_labels(cond, view.drop, null_label)
        x_student = view.noised(x0, view.student)
        target = target_velocity(x0, view.noise)
        if self.gamma == 0:
            pred = student(x_student, tokens.ids, view.student.model, cond, modality=modality)
            loss_fm, groups_fm = flow_matching_loss(pred, target, view.fm_weight, view.channels, view.group_weight)
            return {"loss": loss_fm, "loss_fm": loss_fm.detach(), "loss_rep": torch.zeros((), device=x0.device),
                    **groups_fm}
        aligned_to = self._alignment_target(teacher, tokens)
        pred, feats = captured(student(x_student, tokens.ids, view.student.model, cond, modality=modality,
                                       capture=(self.student_layer,), project=True), (self.student_layer,))
        if aligned_to is None:
            aligned_to = teacher_features(teacher, view.noised(x0, view.teacher), tokens.ids, view.teacher.model,
                                          cond, modality=modality, layer=self.teacher_layer)
        loss_rep = alignment_loss(feats[self.student_layer], aligned_to, view.rep_weight, self.kind.distance)
        loss_fm, groups_fm = flow_matching_loss(pred, target, view.fm_weight, view.channels, view.group_weight)
        return {"loss": loss_fm + self.gamma * loss_rep, "loss_fm": loss_fm.detach(), "loss_rep": loss_rep.detach(),
                **groups_fm}

    def _alignment_target(self, teacher: nn.Module | None, tokens: Tokens) -> torch.Tensor | None:
        """``tokens.target`` for an external target; None when the teacher provides it (checked present)."""
        if self.kind.alignment == "target":
            if tokens.target is None:
                raise ValueError(f"objective.kind={self.kind.name} needs per-token encoder features in "
                                 "tokens.target: configure the modality's REPA encoder (e.g. "
                                 "data.options.repa_encoder for images)")
            return tokens.target
        if teacher is None:
            raise ValueError("the representation loss (γ > 0) needs an EMA teacher")
        return None


def drop_labels(cond: Conditioning, drop: torch.Tensor | float, null_label: int,
                generator: torch.Generator | None = None) -> Conditioning:
    """Replace labels by ``null_label`` where ``drop (B,)`` is True — or, given a probability, with that
    probability (classifier-free guidance).

    A text context is dropped the same way, by the empty caption: its tokens are zeroed and masked out
    (``context_mask`` False), so the data tokens attend to no text at all — the null context that
    text-conditioned modalities also hand to CFG at sampling time.
    """
    if cond.labels is None and cond.context is None:
        return cond
    ref = cond.labels if cond.labels is not None else cond.context
    if not isinstance(drop, torch.Tensor):
        if drop == 0:
            return cond
        drop = torch.rand(ref.shape[:1], generator=generator, device=ref.device) < drop
    update: dict[str, torch.Tensor] = {}
    if cond.labels is not None:
        update["labels"] = torch.where(drop, null_label, cond.labels)
    if cond.context is not None:
        keep = ~drop.to(cond.context.device)
        mask = cond.context_mask if cond.context_mask is not None else torch.ones(
            cond.context.shape[:2], dtype=torch.bool, device=cond.context.device)
        update["context"] = cond.context * keep[:, None, None].to(cond.context.dtype)
        update["context_mask"] = mask.bool() & keep[:, None]
    return cond.model_copy(update=update)
