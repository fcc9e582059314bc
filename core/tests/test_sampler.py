import torch

from selfflow.core.sampler import SamplerConfig, guided_velocity, sample, solve_ode, time_grid
from selfflow.core.tokens import Conditioning


def _gaussian_velocity(m: float, s: float):
    """Exact RF velocity E[ε − x0 | x_t] for data N(m, s²)."""
    def v(x, t):
        t = t.double()[:, None, None]
        var = (1 - t) ** 2 * s**2 + t**2
        r = x.double() - (1 - t) * m
        e_eps = t / var * r
        e_x0 = m + (1 - t) * s**2 / var * r
        return (e_eps - e_x0).to(x.dtype)
    return v


def test_ode_solvers_converge_to_the_exact_flow_map():
    m, s = 1.5, 0.3
    x1 = torch.randn(64, 4, 2, dtype=torch.float64)
    exact = m + s * x1  # the flow maps N(0, 1) to N(m, s²) affinely
    v = _gaussian_velocity(m, s)
    err = {}
    for solver in ("euler", "heun"):
        for steps in (4, 8, 16, 32):
            out = solve_ode(v, x1.clone(), time_grid(steps), solver)
            err[solver, steps] = (out - exact).abs().max().item()
    assert err["heun", 32] < err["heun", 16] < err["heun", 8] < err["heun", 4]
    assert err["euler", 32] < err["euler", 16] < err["euler", 8] < err["euler", 4]
    assert err["euler", 32] > 0.4 * err["euler", 16]  # first order: error halves per doubling
    assert err["heun", 32] < 0.35 * err["heun", 16]  # second order: error ~quarters per doubling
    assert err["heun", 8] < 0.2 * err["euler", 8]


def test_time_grid_and_shift():
    g = time_grid(10, 3.0)
    assert g[0] == 1 and g[-1] == 0 and (g[1:] < g[:-1]).all()
    assert g[5] > 0.5  # shift > 1 spends more steps near noise


class FakeModel:
    def __init__(self):
        self.batches = []

    def __call__(self, x, ids, t, cond, modality=None):
        self.batches.append(x.shape[0])
        return x * 0 + cond.labels.float()[:, None, None]


def test_cfg_is_one_batched_forward_inside_the_interval():
    model = FakeModel()
    x, ids = torch.zeros(2, 3, 1), torch.zeros(2, 3, 3, dtype=torch.long)
    cond, null = Conditioning(labels=torch.tensor([2, 4])), Conditioning(labels=torch.tensor([10, 10]))
    v = guided_velocity(model, ids, cond, null, cfg_scale=3.0, interval=(0.0, 0.7))
    out = v(x, torch.full((2,), 0.5))
    assert model.batches == [4]
    assert torch.allclose(out[:, 0, 0], 10 + 3.0 * (torch.tensor([2.0, 4.0]) - 10))
    out = v(x, torch.full((2,), 0.9))  # outside the interval: conditional only
    assert model.batches == [4, 2] and torch.allclose(out[:, 0, 0], torch.tensor([2.0, 4.0]))


def test_same_seed_same_samples():
    model = FakeModel()
    cfg = SamplerConfig(steps=3)
    cond = Conditioning(labels=torch.tensor([1]))
    ids = torch.zeros(1, 3, 3, dtype=torch.long)
    a = sample(model, torch.randn(1, 3, 2, generator=torch.Generator().manual_seed(5)), ids, cond, cfg)
    b = sample(model, torch.randn(1, 3, 2, generator=torch.Generator().manual_seed(5)), ids, cond, cfg)
    assert torch.equal(a, b)
