import pytest
import torch

from selfflow.core.sampler import (
    SamplerConfig,
    SamplerSettings,
    guided_velocity,
    resolve_sampler,
    sample,
    solve_ode,
    time_grid,
)
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
    assert err["heun", 8] < 0.4 * err["euler", 8]  # (its last step is Euler: still second order overall)


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


class TimeRecorder:
    """v = 1 everywhere; records the time of every call."""

    def __init__(self):
        self.t = []

    def __call__(self, x, t):
        self.t.append(float(t[0]))
        return torch.ones_like(x)


def test_heun_makes_2n_minus_1_calls_and_takes_an_euler_last_step():
    rec = TimeRecorder()
    grid = time_grid(4)
    solve_ode(rec, torch.zeros(1, 1, 1), grid, "heun")
    assert len(rec.t) == 2 * 4 - 1
    # every step but the last evaluates at t and again at t_next; the last only at its start (no call at t = 0)
    assert rec.t == [1.0, 0.75, 0.75, 0.5, 0.5, 0.25, 0.25]
    rec = TimeRecorder()
    solve_ode(rec, torch.zeros(1, 1, 1), grid, "euler")
    assert rec.t == [1.0, 0.75, 0.5, 0.25]


def test_heun_last_step_is_an_euler_step():
    """With v(x, t) = t the Heun correction would change the last step; Euler moves by dt·v(t_last)."""
    grid = time_grid(2)  # 1 → 0.5 → 0
    x = solve_ode(lambda x, t: t[:, None, None].to(x.dtype).expand_as(x), torch.zeros(1, 1, 1, dtype=torch.float64),
                  grid, "heun")
    first = -0.5 * 0.5 * (1.0 + 0.5)  # trapezoid on [1, 0.5]
    assert x.item() == pytest.approx(first - 0.5 * 0.5)  # Euler on [0.5, 0]: dt·v(0.5); Heun would give −0.125


@pytest.mark.parametrize("scale", [0.0, 0.5, 1.0])
def test_cfg_scale_at_most_one_does_no_guidance(scale):
    model = FakeModel()
    cond, null = Conditioning(labels=torch.tensor([2, 4])), Conditioning(labels=torch.tensor([10, 10]))
    ids = torch.zeros(2, 3, 3, dtype=torch.long)
    for solver, calls in (("euler", 3), ("heun", 5), ("sde", 3)):
        model.batches.clear()
        out = sample(model, torch.zeros(2, 3, 1), ids, cond, SamplerConfig(solver=solver, steps=3, cfg_scale=scale),
                     null, generator=torch.Generator().manual_seed(0))
        assert model.batches == [2] * calls  # one forward per model call, never the doubled batch
        assert torch.isfinite(out).all()
    v = guided_velocity(model, ids, cond, null, cfg_scale=scale)
    assert torch.equal(v(torch.zeros(2, 3, 1), torch.full((2,), 0.5))[:, 0, 0], torch.tensor([2.0, 4.0]))


def test_cfg_above_one_doubles_the_batch_for_every_call():
    model = FakeModel()
    cond, null = Conditioning(labels=torch.tensor([2])), Conditioning(labels=torch.tensor([10]))
    sample(model, torch.zeros(1, 3, 1), torch.zeros(1, 3, 3, dtype=torch.long), cond,
           SamplerConfig(solver="heun", steps=3, cfg_scale=1.5), null)
    assert model.batches == [2] * 5


@pytest.mark.filterwarnings("ignore:bf16 on this CPU")  # test_precision checks the warning
def test_bf16_autocast_runs_the_model_in_bfloat16():
    seen = []

    def model(x, ids, t, cond, modality=None):
        y = torch.nn.functional.linear(x, torch.eye(x.shape[-1]))  # a matmul: autocast picks its dtype
        seen.append(y.dtype)
        return y

    cfg = SamplerConfig(steps=2, precision="bf16")
    out = sample(model, torch.randn(1, 3, 2), torch.zeros(1, 3, 3, dtype=torch.long), Conditioning(), cfg)
    assert seen == [torch.bfloat16] * 2 and out.dtype == torch.float32  # the state stays fp32
    seen.clear()
    sample(model, torch.randn(1, 3, 2), torch.zeros(1, 3, 3, dtype=torch.long), Conditioning(), SamplerConfig(steps=2))
    assert seen == [torch.float32] * 2


def test_same_seed_same_samples():
    model = FakeModel()
    cfg = SamplerConfig(steps=3)
    cond = Conditioning(labels=torch.tensor([1]))
    ids = torch.zeros(1, 3, 3, dtype=torch.long)
    a = sample(model, torch.randn(1, 3, 2, generator=torch.Generator().manual_seed(5)), ids, cond, cfg)
    b = sample(model, torch.randn(1, 3, 2, generator=torch.Generator().manual_seed(5)), ids, cond, cfg)
    assert torch.equal(a, b)


def test_resolve_sampler_later_levels_win_and_unset_fields_keep_the_defaults():
    modality = SamplerSettings(shift=3.0, steps=10)
    run = SamplerSettings(steps=20, cfg_scale=4.0, solver="heun")
    entry = SamplerSettings(cfg_scale=5.0)
    got = resolve_sampler(modality, run, entry)
    assert (got.shift, got.steps, got.cfg_scale, got.solver) == (3.0, 20, 5.0, "heun")
    assert got.guidance_interval == SamplerConfig().guidance_interval and got.precision == "fp32"
    assert resolve_sampler() == SamplerConfig()
    assert resolve_sampler(run, modality).steps == 10  # the order is the precedence


def test_sampler_settings_validate_the_fields_they_set():
    with pytest.raises(ValueError, match="steps"):
        SamplerSettings(steps=0)
    with pytest.raises(ValueError, match="unknown"):
        SamplerSettings(unknown=1)
