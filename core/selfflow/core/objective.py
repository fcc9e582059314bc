"""The Self-Flow objective and its baselines as one function (DESIGN §3).

``loss = MSE(v̂, ε − x0) + γ·(−cos(proj(h_l^student), h_k^teacher))`` over data tokens, in fp32. The student
sees per-token noise levels from Dual-Timestep Scheduling; the EMA teacher sees all tokens at ``τ_min`` and
runs only up to block ``k``, without gradients. Vanilla flow matching is the same function with the mask
ratio at 0 and ``γ = 0`` (no teacher forward at all); the paper's ablations are other settings of the same
knobs. REPA aligns the student's projected block-``l`` features with an external frozen encoder's per-token
features (``tokens.target``, computed by the modality, so core never imports the encoder's library).

A modality whose tokens play different roles (video and actions) passes its token groups and a
:class:`~selfflow.core.token_schedule.TokenSchedule`: per-sample schedule modes applied after Dual-Timestep
Scheduling, and per-group loss means (``loss_fm_<group>``). Without them every number is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from .dual_timestep import DualTimesteps, sample_dual_timesteps
from .timesteps import TimestepDistribution, interpolate, target_velocity
from .token_schedule import TokenSchedule, schedule_levels
from .tokens import Conditioning, Tokens


class ObjectiveConfig(BaseModel):
    """Which objective to train. ``kind`` picks a preset; explicit keys override it.

    - ``self_flow``: Dual-Timestep Scheduling + self-distillation (mask ratio from the modality, γ = 0.8).
    - ``flow_matching``: vanilla rectified flow (no mask, γ = 0).
    - ``self_flow_no_mask``: ablation, representation loss without masking (τ = t everywhere).
    - ``self_flow_no_rep``: ablation, Dual-Timestep Scheduling without the representation loss.
    - ``repa``: flow matching + ``γ·(−cos(proj(h_l), target))`` against ``tokens.target`` (γ default 0.5).
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["self_flow", "flow_matching", "self_flow_no_mask", "self_flow_no_rep", "repa"] = "self_flow"
    mask_ratio: float | None = Field(None, ge=0, le=1, description="None: the modality's default R_M")
    gamma: float | None = Field(None, ge=0, description="representation-loss weight (None: 0.8; repa 0.5)")
    student_layer: int | None = Field(None, ge=1, description="None: round(0.3·depth) (paper: 8)")
    teacher_layer: int | None = Field(None, ge=1, description="None: round(0.7·depth) (paper: 20)")
    label_dropout: float = Field(0.1, ge=0, le=1, description="labels → null label, for CFG")
    timesteps: TimestepDistribution | None = Field(None, description="None: the modality's default")

    def resolve(self, depth: int, default_mask_ratio: float,
                default_timesteps: TimestepDistribution) -> ResolvedObjective:
        """Fill every default for a model of ``depth`` blocks and a modality's defaults."""
        uses_mask = self.kind in ("self_flow", "self_flow_no_rep")
        uses_rep = self.kind in ("self_flow", "self_flow_no_mask", "repa")
        mask_ratio = (default_mask_ratio if self.mask_ratio is None else self.mask_ratio) if uses_mask else 0.0
        default_gamma = 0.5 if self.kind == "repa" else 0.8
        gamma = (default_gamma if self.gamma is None else self.gamma) if uses_rep else 0.0
        student = self.student_layer or max(1, round(0.3 * depth))
        teacher = self.teacher_layer or max(1, round(0.7 * depth))
        for name, layer in (("student_layer", student), ("teacher_layer", teacher)):
            if layer > depth:
                raise ValueError(f"objective.{name} = {layer} but the model has only {depth} blocks")
        return ResolvedObjective(mask_ratio=mask_ratio, gamma=gamma, student_layer=student,
                                 teacher_layer=teacher, label_dropout=self.label_dropout,
                                 timesteps=self.timesteps or default_timesteps,
                                 external_target=self.kind == "repa")


@dataclass(frozen=True)
class ResolvedObjective:
    mask_ratio: float
    gamma: float
    student_layer: int
    teacher_layer: int
    label_dropout: float
    timesteps: TimestepDistribution
    external_target: bool = False  # REPA: align with tokens.target instead of the EMA teacher

    @property
    def uses_teacher(self) -> bool:
        return self.gamma > 0 and not self.external_target

    @property
    def uses_projector(self) -> bool:
        return self.gamma > 0


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


@dataclass
class StepNoise:
    """Everything random in one step for a batch: noise, the two levels, the mask and label dropout."""

    noise: torch.Tensor  # (B, L, C)
    dual: DualTimesteps
    drop: torch.Tensor  # (B,) bool

    @classmethod
    def draw(cls, shape: tuple[int, int, int], obj: ResolvedObjective, generator: torch.Generator | None,
             device: torch.device | str, dtype: torch.dtype = torch.float32,
             shard: tuple[int, int] = (0, 1), eligible: torch.Tensor | None = None) -> StepNoise:
        """Draw for the *global* batch ``world × B`` and keep rank ``r``'s slice, so a sample's noise does
        not depend on how many ranks share the batch (1 rank and N ranks train on the same numbers).
        ``eligible (L,)`` bool: the tokens the mask may pick (None: all)."""
        rank, world = shard
        b, length, ch = shape
        g = b * world
        drop = torch.rand(g, generator=generator, device=device) < obj.label_dropout
        noise = torch.randn((g, length, ch), generator=generator, device=device, dtype=dtype)
        dual = sample_dual_timesteps(g, length, obj.timesteps, obj.mask_ratio, generator, device, eligible)
        sl = slice(rank * b, (rank + 1) * b)
        return cls(noise=noise[sl], dual=DualTimesteps(dual.t[sl], dual.s[sl], dual.mask[sl]), drop=drop[sl])


def self_flow_loss(student: nn.Module, teacher: nn.Module | None, tokens: Tokens, cond: Conditioning,
                   obj: ResolvedObjective, *, null_label: int = 0, modality: str | None = None,
                   generator: torch.Generator | None = None, shard: tuple[int, int] = (0, 1),
                   schedule: TokenSchedule | None = None, groups: torch.Tensor | None = None
                   ) -> dict[str, torch.Tensor]:
    """Losses for one batch: ``loss`` (to minimise), ``loss_fm``, ``loss_rep`` (0 when γ = 0).

    ``shard = (rank, world)`` says which slice of the global batch this is (see :meth:`StepNoise.draw`).
    ``schedule`` and ``groups (L,)`` (the modality's :meth:`~selfflow.core.modality.Modality.token_schedule`
    and :meth:`~selfflow.core.modality.Modality.token_groups`) switch to per-group schedules and loss means,
    adding ``loss_fm_<group>`` to the dict.
    """
    if schedule is not None and groups is not None:
        return _scheduled_loss(student, teacher, tokens, cond, obj, schedule, groups, null_label=null_label,
                               modality=modality, generator=generator, shard=shard)
    x0 = tokens.x
    rnd = StepNoise.draw(tuple(x0.shape), obj, generator, x0.device, x0.dtype, shard)
    noise, dual = rnd.noise, rnd.dual
    cond = drop_labels(cond, rnd.drop, null_label)
    # Without a mask every token has level t: the (B,) path broadcasts the modulation instead of gathering.
    tau = dual.token_timesteps() if obj.mask_ratio > 0 else dual.t
    x_tau = interpolate(x0, noise, dual.tau)
    target = target_velocity(x0, noise)

    if obj.external_target and obj.gamma > 0:
        _require_external_target(tokens)
        pred, feats = student(x_tau, tokens.ids, tau, cond, modality=modality,
                              capture=(obj.student_layer,), project=True)
        return _with_alignment(pred, target, feats[obj.student_layer], tokens.target, obj.gamma)

    if not obj.uses_teacher:
        pred = student(x_tau, tokens.ids, tau, cond, modality=modality)
        loss_fm = F.mse_loss(pred.float(), target.float())
        return {"loss": loss_fm, "loss_fm": loss_fm.detach(), "loss_rep": torch.zeros((), device=x0.device)}

    if teacher is None:
        raise ValueError("the representation loss (γ > 0) needs an EMA teacher")
    pred, feats = student(x_tau, tokens.ids, tau, cond, modality=modality,
                          capture=(obj.student_layer,), project=True)
    with torch.no_grad():
        x_min = interpolate(x0, noise, dual.tau_min)
        _, t_feats = teacher(x_min, tokens.ids, dual.tau_min, cond, modality=modality,
                             capture=(obj.teacher_layer,), stop_after=obj.teacher_layer)
    return _with_alignment(pred, target, feats[obj.student_layer], t_feats[obj.teacher_layer], obj.gamma)


def _with_alignment(pred: torch.Tensor, target: torch.Tensor, feats: torch.Tensor, aligned_to: torch.Tensor,
                    gamma: float) -> dict[str, torch.Tensor]:
    """``MSE + γ·(−cos)`` in fp32 (a cast before normalising avoids the bf16/fp16 NaNs users report)."""
    _check_alignment_shapes(feats, aligned_to)
    loss_fm = F.mse_loss(pred.float(), target.float())
    loss_rep = -F.cosine_similarity(feats.float(), aligned_to.float(), dim=-1).mean()
    loss = loss_fm + gamma * loss_rep
    return {"loss": loss, "loss_fm": loss_fm.detach(), "loss_rep": loss_rep.detach()}


def _require_external_target(tokens: Tokens) -> None:
    if tokens.target is None:
        raise ValueError("objective.kind=repa needs per-token encoder features in tokens.target: configure "
                         "the modality's REPA encoder (e.g. data.options.repa_encoder for images)")


def _check_alignment_shapes(feats: torch.Tensor, aligned_to: torch.Tensor) -> None:
    if feats.shape != aligned_to.shape:
        raise ValueError(f"projected features {tuple(feats.shape)} do not match the alignment target "
                         f"{tuple(aligned_to.shape)}: set the projector's output width to the target's")


def _scheduled_loss(student: nn.Module, teacher: nn.Module | None, tokens: Tokens, cond: Conditioning,
                    obj: ResolvedObjective, schedule: TokenSchedule, groups: torch.Tensor, *, null_label: int,
                    modality: str | None, generator: torch.Generator | None, shard: tuple[int, int]
                    ) -> dict[str, torch.Tensor]:
    """:func:`self_flow_loss` under a token schedule (see :mod:`selfflow.core.token_schedule`)."""
    x0 = tokens.x
    groups = groups.to(x0.device)
    rnd = StepNoise.draw(tuple(x0.shape), obj, generator, x0.device, x0.dtype, shard,
                         eligible=schedule.eligible(groups.cpu()))
    cond = drop_labels(cond, rnd.drop, null_label)
    lv = schedule_levels(schedule, groups, rnd.dual, obj.timesteps, generator, shard)
    # (L, C) or None: a group's first `channels` are its content; the rest (padding, flags) stays as given.
    channels = schedule.channel_mask(groups, x0.shape[-1])
    x_tau = _content_only(interpolate(x0, rnd.noise, lv.student.dense()), x0, channels)
    target = target_velocity(x0, rnd.noise)
    rep = obj.gamma > 0
    if not rep:
        pred = student(x_tau, tokens.ids, lv.student, cond, modality=modality)
    else:
        if obj.external_target:
            _require_external_target(tokens)
        if not obj.external_target and teacher is None:
            raise ValueError("the representation loss (γ > 0) needs an EMA teacher")
        pred, feats = student(x_tau, tokens.ids, lv.student, cond, modality=modality,
                              capture=(obj.student_layer,), project=True)
        feats = feats[obj.student_layer]
        if obj.external_target:
            aligned = tokens.target
        else:
            with torch.no_grad():
                x_teacher = _content_only(interpolate(x0, rnd.noise, lv.teacher.dense()), x0, channels)
                _, t_feats = teacher(x_teacher, tokens.ids, lv.teacher, cond, modality=modality,
                                     capture=(obj.teacher_layer,), stop_after=obj.teacher_layer)
            aligned = t_feats[obj.teacher_layer]
        _check_alignment_shapes(feats, aligned)
    sq = (pred.float() - target.float()).pow(2)  # (B, L, C)
    err = sq.mean(-1) if channels is None else (sq * channels).sum(-1) / channels.sum(-1)  # (B, L) per-token MSE
    loss_fm = (lv.fm_weight * err).sum()
    if rep:
        cos = F.cosine_similarity(feats.float(), aligned.float(), dim=-1)  # (B, L)
        loss_rep = -(lv.rep_weight * cos).sum()
    else:
        loss_rep = torch.zeros((), device=x0.device)
    out = {"loss": loss_fm + obj.gamma * loss_rep, "loss_fm": loss_fm.detach(), "loss_rep": loss_rep.detach()}
    out.update({f"loss_fm_{name}": (w * err).sum().detach() for name, w in lv.group_weight.items()})
    return out


def _content_only(x_t: torch.Tensor, x0: torch.Tensor, channels: torch.Tensor | None) -> torch.Tensor:
    """Noise only the content channels ``(L, C)`` of each token; padding and flags keep their data values."""
    return x_t if channels is None else torch.where(channels, x_t, x0)
