"""The SDE sampler of the Self-Flow / SiT / REPA ImageNet numbers: Euler–Maruyama with ``w(t) = σ_t``.

It runs in SiT time ``s = 1 − t`` (s = 0 noise, s = 1 data) on the official grid ``linspace(0, 1 − h, N)``
(float32): ``N − 1`` stochastic steps, then one deterministic "Mean" step of size ``h = 0.04`` to the data,
so ``N = 250`` costs 250 model calls. Per step, with the SiT velocity ``v = −v_RF``::

    score = (s·v − x) / ((1 − s)² + s·(1 − s))      # linear path, velocity → score
    drift = v + w·score,   w = 1 − s                 # diffusion "sigma", norm 1
    x ← x + drift·dt + sqrt(2w)·sqrt(dt)·ξ,  ξ ~ N(0, I)

The Brownian increments ``ξ`` are drawn one ``randn`` per step in the state's shape — with classifier-free
guidance the official loop carries a doubled batch ``[null; cond]`` and keeps the conditional half, so there
each draw is ``(2B, …)`` and its second half is used. With one generator (the official order) samples can be
compared one by one against the official sampler from the same seed and initial noise; with one generator
per sample, a sample does not depend on its batch (``selfflow sample`` on any number of ranks).

A time ``shift`` ≠ 1 (for models trained on a shifted t, e.g. the RAE / FLUX.2-AE recipes) spaces the
stochastic steps as the shifted ODE grid does: RF times ``shift_time(u)`` for ``u`` uniform from 1 down to
the point that the shift maps onto ``last_step_size``, so the steps differ in size while the last model call
stays at t = 0.04 and the deterministic last step keeps its size (warping it too would stretch it to
``s·h / (1 + (s − 1)·h)``, 0.22 at s = √48, and visibly shrink the sample variance). With shift 1 the grid,
the constant step and the 0.04 last step are exactly the official ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .timesteps import shift_time, unshift_time

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x (B, L, C), t_RF (B,)) → v_RF


def sde_grid(steps: int = 250, last_step_size: float = 0.04, shift: float = 1.0) -> torch.Tensor:
    """The ``steps`` SiT times ``linspace(0, 1 − last_step_size, steps)`` (float32, as the official); with a
    ``shift``, RF times ``shift_time(u)`` for ``u`` uniform on ``[1, unshift_time(last_step_size)]``."""
    if steps < 2:
        raise ValueError(f"the SDE sampler needs at least 2 steps, got {steps}")
    if not 0.0 < last_step_size < 1.0:
        raise ValueError(f"last_step_size must lie in (0, 1), got {last_step_size}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    if shift == 1.0:
        return torch.linspace(0.0, 1.0 - last_step_size, steps)
    end = float(unshift_time(torch.tensor(last_step_size, dtype=torch.float64), shift))
    return (1 - shift_time(torch.linspace(1.0, end, steps, dtype=torch.float64), shift)).float()


def _sde_drift(x: torch.Tensor, s: torch.Tensor, v_sit: torch.Tensor) -> torch.Tensor:
    s = s.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    sigma = 1 - s
    var = sigma**2 + s * sigma
    score = (s * v_sit - x) / var
    return v_sit + sigma * score


def _brownian(shape: tuple[int, ...], generator: torch.Generator | Sequence[torch.Generator] | None,
              batch_factor: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``ξ (B, …)`` for this step. One generator: one draw of ``(batch_factor·B, …)``, the last B rows kept.
    A list: one draw per sample from its own generator (batch-independent)."""
    b, rest = shape[0], shape[1:]
    if isinstance(generator, Sequence):
        return torch.cat([torch.randn((1, *rest), generator=g, device=g.device) for g in generator]).to(device, dtype)
    dev = generator.device if generator is not None else device
    xi = torch.randn((batch_factor * b, *rest), generator=generator, device=dev)
    return xi[-b:].to(device, dtype)


@torch.no_grad()
def solve_sde(velocity: VelocityFn, x: torch.Tensor, steps: int = 250, last_step_size: float = 0.04,
              generator: torch.Generator | Sequence[torch.Generator] | None = None, batch_factor: int = 1,
              progress: Callable[[], None] | None = None, shift: float = 1.0) -> torch.Tensor:
    """Integrate the reverse SDE from noise ``x`` (RF t = 1) to data; ``velocity(x, t_RF (B,))`` is the RF
    velocity (e.g. :func:`~selfflow.core.sampler.guided_velocity`). ``steps`` model calls in total."""
    grid = sde_grid(steps, last_step_size, shift)
    # shift 1: the official constant step t[1] − t[0] (bitwise: not the float32 diffs of linspace)
    dts = (grid[1] - grid[0]).expand(steps - 1) if shift == 1.0 else grid.diff()
    b = x.shape[0]
    for s, dt in zip(grid[:-1], dts):
        s_b = torch.full((b,), float(s), dtype=torch.float32, device=x.device)
        xi = _brownian(tuple(x.shape), generator, batch_factor, x.device, x.dtype)
        v_sit = -velocity(x, 1 - s_b)
        mean_x = x + _sde_drift(x, s_b, v_sit) * dt.item()
        x = mean_x + torch.sqrt(2 * (1 - s_b)).view(-1, *([1] * (x.ndim - 1))).to(x.dtype) * xi * dt.sqrt().item()
        if progress is not None:
            progress()
    s_b = torch.full((b,), float(grid[-1]), dtype=torch.float32, device=x.device)
    x = x + _sde_drift(x, s_b, -velocity(x, 1 - s_b)) * last_step_size  # deterministic "Mean" last step
    if progress is not None:
        progress()
    return x
