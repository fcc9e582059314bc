"""ODE samplers in RF time (t = 1 noise → t = 0 data) with classifier-free guidance; the SDE solver of the
ImageNet numbers is in :mod:`.sde` and selected here with ``solver: sde``.

A sampler integrates ``dx/dt = v(x, t)`` on a time grid; guidance is a wrapper around the velocity
function that runs the conditional and unconditional halves in one batched forward, inside a guidance
interval of t. Same generator seed → same samples.

Two conventions follow the reference code rather than the textbook: Heun takes a plain Euler step on its
last step, to t = 0 (REPA ``euler_sampler``, EDM Algorithm 1: 2N − 1 model calls), and guidance runs only
for ``cfg_scale > 1`` (REPA and the official Self-Flow sampler: a scale ≤ 1 samples the conditional model).
``precision: bf16`` runs the model under ``torch.autocast(bfloat16)`` as the official ``sample.py`` does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .precision import autocast
from .sde import solve_sde
from .timesteps import shift_time
from .tokens import Conditioning

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x (B, L, C), t (B,)) → v


def _ordered_interval(v: tuple[float, float] | None) -> tuple[float, float] | None:
    if v is not None and not 0 <= v[0] <= v[1] <= 1:
        raise ValueError("needs 0 <= low <= high <= 1 (low above high would turn guidance off)")
    return v


class SamplerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    solver: Literal["euler", "heun", "sde"] = Field(
        "euler", description="ODE euler/heun, or sde: Euler–Maruyama as the official ImageNet sampler")
    steps: int = Field(50, ge=1, description="ODE steps; for sde the model calls (250: 249 SDE + last step)")
    shift: float = Field(1.0, gt=0, description="time shift of the grid, ODE or SDE (1: uniform / official)")
    last_step_size: float = Field(0.04, gt=0, lt=1, description="sde: deterministic last step to the data")
    cfg_scale: float = Field(1.0, ge=0, description="classifier-free guidance (≤ 1: none, as the official)")
    guidance_interval: tuple[float, float] = Field((0.0, 1.0), description="apply CFG for t in [lo, hi]")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16: model under bfloat16 autocast")

    _interval = field_validator("guidance_interval")(_ordered_interval)

    @model_validator(mode="after")
    def _sde_steps(self) -> SamplerConfig:
        if self.solver == "sde" and self.steps < 2:
            raise ValueError(f"steps: the sde solver needs at least 2 model calls (steps − 1 stochastic ones and "
                             f"the last deterministic one), got {self.steps}")
        return self


class SamplerSettings(BaseModel):
    """Sampler settings of one level of a run (a modality's defaults, the run's ``sample`` section, a mixture
    entry's ``sample``); a field left ``None`` is inherited from the level below (see :func:`resolve_sampler`)."""

    model_config = ConfigDict(extra="forbid")

    solver: Literal["euler", "heun", "sde"] | None = Field(None, description="euler/heun ODE, or sde")
    steps: int | None = Field(None, ge=1, description="ODE steps; for sde the model calls")
    shift: float | None = Field(None, gt=0, description="time shift of the grid (1: uniform)")
    last_step_size: float | None = Field(None, gt=0, lt=1, description="sde: deterministic last step")
    cfg_scale: float | None = Field(None, ge=0, description="classifier-free guidance (≤ 1: none)")
    guidance_interval: tuple[float, float] | None = Field(None, description="apply CFG for t in [lo, hi]")
    precision: Literal["fp32", "bf16"] | None = Field(None, description="bf16: model under bfloat16 autocast")

    _interval = field_validator("guidance_interval")(_ordered_interval)


def resolve_sampler(*levels: SamplerSettings) -> SamplerConfig:
    """The :class:`SamplerConfig` of ``levels``, lowest precedence first: a level's set fields override the
    levels before it, and fields no level sets keep :class:`SamplerConfig`'s defaults."""
    fields: dict = {}
    for level in levels:
        fields.update(level.model_dump(include=set(SamplerSettings.model_fields), exclude_none=True))
    return SamplerConfig.model_validate(fields)


def time_grid(steps: int, shift: float = 1.0, device: torch.device | str = "cpu") -> torch.Tensor:
    """``steps + 1`` times from 1 (noise) to 0 (data), warped by ``shift``."""
    return shift_time(torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=torch.float64), shift)


@torch.no_grad()
def solve_ode(velocity: VelocityFn, x: torch.Tensor, grid: torch.Tensor,
              solver: Literal["euler", "heun"] = "euler", progress: Callable[[], None] | None = None
              ) -> torch.Tensor:
    """Integrate from ``grid[0]`` to ``grid[-1]``. Heun uses 2 velocity calls per step except the last, an
    Euler step (as REPA and EDM): ``2N − 1`` calls for N steps."""
    if solver not in ("euler", "heun"):
        raise ValueError(f"unknown solver {solver!r} (euler, heun)")
    b = x.shape[0]
    last = len(grid) - 2
    for i in range(len(grid) - 1):
        t, t_next = float(grid[i]), float(grid[i + 1])
        dt = t_next - t
        v = velocity(x, torch.full((b,), t, device=x.device))
        if solver == "euler" or i == last:
            x = x + dt * v
        else:
            x_pred = x + dt * v
            v_next = velocity(x_pred, torch.full((b,), t_next, device=x.device))
            x = x + dt * 0.5 * (v + v_next)
        if progress is not None:
            progress()
    return x


def concat_conditions(a: Conditioning, b: Conditioning) -> Conditioning:
    """Stack two conditionings along the batch (for one CFG forward)."""
    def cat(u: torch.Tensor | None, v: torch.Tensor | None) -> torch.Tensor | None:
        if u is None and v is None:
            return None
        if u is None or v is None:
            raise ValueError("cannot batch a conditioning that has a field with one that lacks it")
        return torch.cat([u, v])
    return Conditioning(labels=cat(a.labels, b.labels), context=cat(a.context, b.context),
                        context_mask=cat(a.context_mask, b.context_mask))


def guided_velocity(model: Callable, ids: torch.Tensor, cond: Conditioning, null_cond: Conditioning | None,
                    cfg_scale: float = 1.0, interval: tuple[float, float] = (0.0, 1.0),
                    modality: str | None = None) -> VelocityFn:
    """``v = v_u + w·(v_c − v_u)`` for t in ``interval`` and ``w > 1``, else ``v_c``; both halves in one
    forward."""
    lo, hi = interval

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        guided = uses_guidance(cfg_scale, null_cond)
        if guided and not (lo <= 0.0 and hi >= 1.0):  # reading t waits for the GPU: only when an interval limits CFG
            guided = lo <= float(t[0]) <= hi
        if not guided:
            return model(x, ids, t, cond, modality=modality)
        both = model(torch.cat([x, x]), torch.cat([ids, ids]), torch.cat([t, t]),
                     concat_conditions(cond, null_cond), modality=modality)
        v_c, v_u = both.chunk(2)
        return v_u + cfg_scale * (v_c - v_u)

    return velocity


def uses_guidance(cfg_scale: float, null_cond: Conditioning | None) -> bool:
    """Guidance runs for ``cfg_scale > 1`` only (the reference samplers' test), and needs a null condition."""
    return cfg_scale > 1.0 and null_cond is not None


def sample(model: Callable, noise: torch.Tensor, ids: torch.Tensor, cond: Conditioning,
           cfg: SamplerConfig, null_cond: Conditioning | None = None, modality: str | None = None,
           progress: Callable[[], None] | None = None,
           generator: torch.Generator | Sequence[torch.Generator] | None = None) -> torch.Tensor:
    """Generate from ``noise (B, L, C)`` at t = 1 down to data tokens at t = 0. ``generator`` drives the
    SDE's Brownian increments (one, or one per sample)."""
    velocity = guided_velocity(model, ids, cond, null_cond, cfg.cfg_scale, cfg.guidance_interval, modality)
    with autocast(cfg.precision, noise.device):
        if cfg.solver == "sde":
            factor = 2 if uses_guidance(cfg.cfg_scale, null_cond) else 1  # the official loop carries [null; cond]
            return solve_sde(velocity, noise, cfg.steps, cfg.last_step_size, generator, factor, progress, cfg.shift)
        grid = time_grid(cfg.steps, cfg.shift, noise.device)
        return solve_ode(velocity, noise, grid, cfg.solver, progress)
