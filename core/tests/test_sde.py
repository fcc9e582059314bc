import torch

from selfflow.core.sampler import SamplerConfig, sample, solve_ode, time_grid
from selfflow.core.sde import sde_grid, solve_sde
from selfflow.core.tokens import Conditioning

from .test_sampler import _gaussian_velocity


class Recorder:
    """A velocity that records every call's RF time and batch size; v = x (a contraction)."""

    def __init__(self):
        self.t, self.batch = [], []

    def __call__(self, x, ids, t, cond, modality=None):
        self.t.append(float(t[0]))
        self.batch.append(x.shape[0])
        return 0.1 * x


def test_250_nfe_on_the_official_grid_with_a_mean_last_step():
    rec = Recorder()
    x = torch.randn(2, 4, 3)
    cfg = SamplerConfig(solver="sde", steps=250)
    sample(rec, x, torch.zeros(2, 4, 3, dtype=torch.long), Conditioning(), cfg,
           generator=torch.Generator().manual_seed(0))
    assert len(rec.t) == 250
    sit = torch.linspace(0, 0.96, 250)
    assert torch.allclose(torch.tensor(rec.t[:-1]), 1 - sit[:-1], atol=1e-7)  # 249 SDE steps, from t_RF = 1
    assert rec.t[0] == 1.0 and abs(rec.t[-1] - 0.04) < 1e-6  # the last call at 0.04, then straight to data
    assert torch.equal(sde_grid(), sit)


def _manual_reference(x, v_rf, xi_list):
    """The same recursion written out in RF time from the SiT formulas."""
    s = torch.linspace(0, 0.96, 250, dtype=torch.float64)
    dt = float(s[1] - s[0])
    for i, si in enumerate(s[:-1].tolist()):
        v = -v_rf(x, torch.full((x.shape[0],), 1 - si))
        score = (si * v - x) / ((1 - si) ** 2 + si * (1 - si))
        x = x + (v + (1 - si) * score) * dt + (2 * (1 - si)) ** 0.5 * dt**0.5 * xi_list[i]
    si = 0.96
    v = -v_rf(x, torch.full((x.shape[0],), 1 - si))
    return x + (v + (1 - si) * (si * v - x) / ((1 - si) ** 2 + si * (1 - si))) * 0.04


def test_brownian_draws_follow_the_official_order_and_shapes():
    m, s = 1.5, 0.3
    v = _gaussian_velocity(m, s)
    x1 = torch.randn(3, 4, 2, dtype=torch.float64)
    # official order, CFG on: one (2B, …) draw per step, the conditional (second) half used
    g = torch.Generator().manual_seed(7)
    xi = [torch.randn(6, 4, 2, generator=g)[3:].double() for _ in range(249)]
    ours = solve_sde(v, x1.clone(), 250, generator=torch.Generator().manual_seed(7), batch_factor=2)
    assert torch.allclose(ours, _manual_reference(x1.clone(), v, xi), atol=1e-9)
    # one generator per sample: sample 1 alone equals sample 1 in the batch
    gens = lambda: [torch.Generator().manual_seed(100 + i) for i in range(3)]  # noqa: E731
    batch = solve_sde(v, x1.clone(), 20, generator=gens())
    alone = solve_sde(v, x1[1:2].clone(), 20, generator=[gens()[1]])
    assert torch.equal(batch[1:2], alone)


def test_sde_samples_the_target_distribution():
    m, s = 1.5, 0.3
    x = solve_sde(_gaussian_velocity(m, s), torch.randn(4000, 1, 1, dtype=torch.float64), 250,
                  generator=torch.Generator().manual_seed(0))
    assert abs(x.mean().item() - m) < 0.03 and abs(x.std().item() - s) < 0.03


def test_heun_error_against_a_500_step_solution_falls_with_steps():
    """A nonlinear velocity with no closed form: 500 Heun steps are the reference."""
    def v(x, t):
        tt = t.double()[:, None, None]
        return torch.sin(3 * x) * (1 + tt) - 0.5 * x

    x1 = torch.randn(16, 4, 2, dtype=torch.float64)
    ref = solve_ode(v, x1.clone(), time_grid(500), "heun")
    errs = [(solve_ode(v, x1.clone(), time_grid(n, shift=2.0), "heun") - ref).abs().max().item()
            for n in (5, 10, 20, 40)]
    assert errs[0] > errs[1] > errs[2] > errs[3] and errs[3] < 0.05 * errs[0]


def test_shifted_grid_spaces_the_steps_as_the_shifted_ode_grid_and_keeps_the_last_step():
    rec = Recorder()
    x = torch.randn(2, 4, 3)
    sample(rec, x, torch.zeros(2, 4, 3, dtype=torch.long), Conditioning(),
           SamplerConfig(solver="sde", steps=50, shift=3.0), generator=torch.Generator().manual_seed(0))
    end = 0.04 / (3 - 2 * 0.04)  # the u that shift 3 maps onto 0.04
    u = torch.linspace(1, end, 50, dtype=torch.float64)
    warped = 3 * u / (1 + 2 * u)
    assert len(rec.t) == 50
    assert torch.allclose(torch.tensor(rec.t, dtype=torch.float64), warped, atol=1e-6)
    assert abs(rec.t[-1] - 0.04) < 1e-6 and rec.t[1] > 1 - 0.96 / 49  # last call at 0.04; early steps shorter
    assert torch.equal(sde_grid(250, 0.04, 1.0), torch.linspace(0, 0.96, 250))  # shift 1: the official grid


def test_shifted_sde_follows_its_grid_and_samples_the_target():
    m, s = 1.5, 0.3
    v = _gaussian_velocity(m, s)
    x1 = torch.randn(3, 4, 2, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    xi = [torch.randn(3, 4, 2, generator=g).double() for _ in range(29)]
    grid = sde_grid(30, 0.04, 2.0).double()
    x = x1.clone()
    for i in range(29):  # Euler–Maruyama with the step sizes of the warped grid
        si, dt = float(grid[i]), float(grid[i + 1] - grid[i])
        vs = -v(x, torch.full((3,), 1 - si))
        score = (si * vs - x) / ((1 - si) ** 2 + si * (1 - si))
        x = x + (vs + (1 - si) * score) * dt + (2 * (1 - si) * dt) ** 0.5 * xi[i]
    si = float(grid[-1])
    vs = -v(x, torch.full((3,), 1 - si))
    ref = x + (vs + (1 - si) * (si * vs - x) / ((1 - si) ** 2 + si * (1 - si))) * 0.04
    ours = solve_sde(v, x1.clone(), 30, generator=torch.Generator().manual_seed(3), shift=2.0)
    assert torch.allclose(ours, ref, atol=1e-5)
    x = solve_sde(v, torch.randn(4000, 1, 1, dtype=torch.float64), 250, generator=torch.Generator().manual_seed(0),
                  shift=3.0)
    assert abs(x.mean().item() - m) < 0.03 and abs(x.std().item() - s) < 0.03
