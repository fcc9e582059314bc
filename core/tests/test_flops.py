import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from selfflow.core.flops import train_step_flops
from selfflow.core.mmdit import MMDiT, mmdit_forward_flops
from selfflow.core.tokens import Conditioning, grid_ids

from .conftest import tiny_config


@pytest.mark.parametrize("ctx", [0, 10])
def test_analytic_forward_flops_match_torch_flop_counter(ctx):
    # the math attention backend makes QKᵀ and AV visible to the counter (CPU SDPA kernels are not counted)
    cfg = tiny_config(context_dim=ctx, hidden_size=128, num_heads=4, axes_dim=(8, 12, 12), attention="math")
    model = MMDiT(cfg).eval()
    b, grid = 2, 8
    x, ids = torch.randn(b, grid * grid, 12), grid_ids(1, grid, grid, b)
    cond = Conditioning(labels=torch.zeros(b, dtype=torch.long),
                        context=torch.randn(b, 6, ctx) if ctx else None)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, ids, torch.rand(b), cond)
    measured = counter.get_total_flops() / b
    analytic = mmdit_forward_flops(cfg, grid * grid, 6 if ctx else 0, token_channels=12)
    assert analytic == pytest.approx(measured, rel=0.03)  # leaves out only the tiny per-sample MLPs
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, ids, torch.rand(b), cond, capture=(2,), stop_after=2)
    assert mmdit_forward_flops(cfg, 64, 6 if ctx else 0, upto=2, token_channels=12) == pytest.approx(
        counter.get_total_flops() / b, rel=0.05)
    assert train_step_flops(model, 64, teacher_layer=3) > 3 * model.forward_flops(64)
