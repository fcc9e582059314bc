"""Rectified-flow path and timestep distributions, in the FLUX convention used across the API.

``x_t = (1 − t)·x0 + t·ε``: t = 0 is data, t = 1 is noise, and the target velocity is ``ε − x0``.
A *shift* ``s`` warps t towards noise, ``t' = s·t / (1 + (s − 1)·t)`` (SD3/FLUX), for training and sampling.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field


class TimestepDistribution(BaseModel):
    """Where training timesteps are drawn from, before the shift: ``uniform``, ``logit_normal(mean, std)`` or
    ``plateau_logit_normal(mean, std, plateau)``.

    ``plateau_logit_normal`` is this framework's definition (the reference notes name no formula): the mixture
    ``(1 − plateau)·LogitNormal(mean, std) + plateau·U(0, 1)``. The uniform part is a flat floor ("plateau")
    under the logit-normal bump, so the tails near t = 0 and t = 1 are never starved; ``plateau = 0`` is the
    plain logit-normal. For RAE latents use it with a train shift, e.g. :func:`dimension_shift` (RAE's
    ``time_dist_shift_dim``: ``sqrt(768·16·16 / 4096) ≈ 6.93``).
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["uniform", "logit_normal", "plateau_logit_normal"] = "uniform"
    mean: float = 0.0
    std: float = Field(1.0, gt=0)
    shift: float = Field(1.0, gt=0)
    plateau: float = Field(0.1, ge=0, le=1, description="plateau_logit_normal: weight of the uniform floor")

    def sample(self, n: int, generator: torch.Generator | None = None,
               device: torch.device | str = "cpu") -> torch.Tensor:
        """``n`` timesteps in [0, 1] (float32)."""
        if self.kind == "uniform":
            t = torch.rand(n, generator=generator, device=device)
        else:
            t = torch.sigmoid(self.mean + self.std * torch.randn(n, generator=generator, device=device))
            if self.kind == "plateau_logit_normal":
                flat = torch.rand(n, generator=generator, device=device)
                pick = torch.rand(n, generator=generator, device=device) < self.plateau
                t = torch.where(pick, flat, t)
        return shift_time(t, self.shift)

    def cdf(self, t: torch.Tensor) -> torch.Tensor:
        """Cumulative distribution function (used by tests of per-token marginals)."""
        u = unshift_time(t.double().clamp(0, 1), self.shift)
        if self.kind == "uniform":
            return u
        z = (torch.logit(u.clamp(1e-12, 1 - 1e-12)) - self.mean) / self.std
        ln = 0.5 * (1 + torch.erf(z / 2**0.5))
        if self.kind == "plateau_logit_normal":
            return (1 - self.plateau) * ln + self.plateau * u
        return ln


def dimension_shift(dim: int, base_dim: int = 4096) -> float:
    """RAE's dimension-dependent train shift ``sqrt(dim / base_dim)`` (``dim`` = C·H·W of the latent)."""
    return (dim / base_dim) ** 0.5


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Warp ``t`` towards noise by ``shift`` (identity at 1)."""
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def unshift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Inverse of :func:`shift_time`."""
    if shift == 1.0:
        return t
    return t / (shift - (shift - 1) * t)


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 − t)·x0 + t·ε``; ``t`` broadcasts from the left: ``(B,)`` or ``(B, L)`` for ``(B, L, C)``."""
    while t.ndim < x0.ndim:
        t = t.unsqueeze(-1)
    return (1 - t) * x0 + t * noise


def target_velocity(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``d x_t / d t = ε − x0``."""
    return noise - x0
