"""Dual-Timestep Scheduling (Self-Flow §3.3).

Per sample draw ``t`` and ``s`` independently from the base distribution (unsorted, so each token's
noise level keeps the base marginal), mask exactly ``round(R_M·L)`` random tokens, and give masked tokens
``s`` and the others ``t``. The student sees ``x_τ`` per token; the EMA teacher sees every token at the
cleaner level ``τ_min = min(t, s)`` (``teacher_level="min_ts"``), or — SRA's choice when nothing is masked —
at the student's level ``t`` (``teacher_level="t"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from .modulation import TokenTimesteps
from .timesteps import TimestepDistribution

TeacherLevel = Literal["min_ts", "t"]
TEACHER_LEVELS: tuple[str, ...] = ("min_ts", "t")


@dataclass
class DualTimesteps:
    """``t, s (B,)``, ``mask (B, L)`` bool (True → token uses ``s``)."""

    t: torch.Tensor
    s: torch.Tensor
    mask: torch.Tensor

    @property
    def tau(self) -> torch.Tensor:
        """Per-token timesteps ``(B, L)``."""
        return torch.where(self.mask, self.s[:, None], self.t[:, None])

    @property
    def tau_min(self) -> torch.Tensor:
        """The teacher's single level per sample ``(B,)``."""
        return torch.minimum(self.t, self.s)

    def teacher_level(self, level: TeacherLevel) -> torch.Tensor:
        """The teacher's single level per sample ``(B,)``: ``τ_min`` or ``t``."""
        return self.tau_min if level == "min_ts" else self.t

    def token_timesteps(self) -> TokenTimesteps:
        """The student's τ as two levels per sample: index 0 → t, 1 → s (no search, no device sync)."""
        return TokenTimesteps.from_levels(torch.stack([self.t, self.s], 1), self.mask.long())


def exact_count_mask(batch: int, length: int, ratio: float, generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu", eligible: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, L)`` bool with exactly ``round(ratio·L)`` True entries per row at uniformly random places.

    ``eligible (L,)`` bool restricts the mask to those tokens (exactly ``round(ratio·n_eligible)`` per row,
    e.g. the video tokens of a video–action sequence); the generator advances by the same ``B·L`` draws
    either way, so later draws of the step do not depend on it.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio must lie in [0, 1], got {ratio}")
    u = torch.rand(batch, length, generator=generator, device=device)
    if eligible is None:
        n_masked = round(ratio * length)
    else:
        n_masked = round(ratio * int(eligible.sum()))  # pass a host tensor to avoid a device sync
        eligible = eligible.to(device=u.device, dtype=torch.bool)
        u = torch.where(eligible, u, 2.0)  # ineligible tokens rank last, never among the first n_masked
    ranks = u.argsort(dim=1).argsort(dim=1)
    return ranks < n_masked


def sample_dual_timesteps(batch: int, length: int, dist: TimestepDistribution, mask_ratio: float,
                          generator: torch.Generator | None = None, device: torch.device | str = "cpu",
                          eligible: torch.Tensor | None = None) -> DualTimesteps:
    """Draw ``t``, ``s`` from ``dist`` and a mask of ratio ``mask_ratio`` (0 → plain flow matching) over the
    ``eligible (L,)`` tokens (None: all)."""
    t = dist.sample(batch, generator, device)
    s = dist.sample(batch, generator, device)
    mask = exact_count_mask(batch, length, mask_ratio, generator, device, eligible)
    return DualTimesteps(t=t, s=s, mask=mask)
