"""The analytic FLOPs behind the SiT-XL/2 row's bound equal what PyTorch's FLOP counter sees in the two steps."""

from unittest import mock

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import selfflow.core.linear as linear_module
import selfflow.core.modulation as modulation
from benchmarks import dit_bench
from selfflow.core.modulation import TokenTimesteps
from selfflow.core.tokens import Conditioning, grid_ids


def _counted(step) -> float:
    """FLOPs of one step's forward and backward (the optimizer and EMA are not FLOP-counted ops)."""
    with FlopCounterMode(display=False) as counter, mock.patch.object(torch.optim.AdamW, "step"):
        step()
    return counter.get_total_flops()


@pytest.mark.timeout(300)
def test_step_flops_match_the_flop_counter():
    batch = 2
    ours_step, naive_step = dit_bench.xl2_step_pair(batch, preset="S/2", attention="math")  # math: counted bmm
    ours, naive = dit_bench.xl2_step_flops("S/2")
    counted_ours, counted_naive = _counted(ours_step) / batch, _counted(naive_step) / batch
    # The analytic count leaves out the projector, the second level's adaLN and the losses: ~2 % of ours.
    assert ours == pytest.approx(counted_ours, rel=0.03)
    assert naive == pytest.approx(counted_naive, rel=0.03)
    assert naive / ours == pytest.approx(counted_naive / counted_ours, rel=0.02)
    assert counted_naive / counted_ours > 1.5  # the naive step does per-token adaLN and a full-depth teacher


def test_the_naive_per_token_path_computes_the_same_model():
    """Levels = tokens without our gather (the official class's way) gives the model our factorised path gives."""
    torch.manual_seed(0)
    model = dit_bench._model("tiny")
    batch, length = 2, dit_bench.L
    x, ids = torch.randn(batch, length, dit_bench.CH), grid_ids(1, dit_bench.GRID, dit_bench.GRID, batch)
    mask = torch.rand(batch, length) < 0.25
    dense = torch.where(mask, torch.rand(batch, 1), torch.rand(batch, 1))  # (B, L), two levels per sample
    labels = Conditioning(labels=torch.arange(batch))
    with torch.no_grad():
        ours = model(x, ids, dense, labels)
        with (dit_bench.official_modulation(),
              mock.patch.object(modulation, "_ModulateLevels", None), mock.patch.object(modulation, "_GateLevels", None)):
            # the official expressions only: our level Functions, were they reached, would fail here
            naive = model(x, ids, TokenTimesteps.from_levels(dense, torch.arange(length).expand(batch, length)),
                          labels)
    torch.testing.assert_close(naive, ours, rtol=1e-5, atol=1e-5)


@pytest.mark.timeout(300)
@pytest.mark.skipif(not linear_module._onednn_available(), reason="PyTorch built without oneDNN: no path of ours")
def test_the_naive_step_runs_nn_linears_kernels_and_ours_our_linear():
    """The official class's Linear is ``nn.Linear`` (``F.linear``): the naive step never takes our oneDNN path,
    while ours does (``core.linear``, on where oneDNN is built in)."""
    calls = []
    real = linear_module._matmul

    def spy(*args):
        calls.append(1)
        return real(*args)

    ours_step, naive_step = dit_bench.xl2_step_pair(1, preset="S/2")
    with mock.patch.object(linear_module, "_matmul", spy), linear_module.onednn_linear(True):
        naive_step()
        assert calls == []
        ours_step()
        assert calls


def test_round_ratios_give_the_spread_of_baseline_over_ours_per_round():
    assert dit_bench.round_ratios([24.0, 25.0, 30.0], [15.0, 15.0, 16.0]) == "1.60–1.88 over 3 rounds"
    with pytest.raises(ValueError):  # rounds that do not pair up are a bug, not a shorter range
        dit_bench.round_ratios([24.0, 25.0], [15.0])
