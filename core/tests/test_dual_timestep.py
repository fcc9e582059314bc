import pytest
import torch
from scipy import stats

from selfflow.core.dual_timestep import exact_count_mask, sample_dual_timesteps
from selfflow.core.timesteps import TimestepDistribution


@pytest.mark.parametrize("dist", [TimestepDistribution(), TimestepDistribution(kind="logit_normal", shift=3.0)])
def test_each_token_keeps_the_base_marginal(dist):
    g = torch.Generator().manual_seed(1)
    dual = sample_dual_timesteps(4000, 16, dist, 0.25, g)
    for token in (0, 7):  # a fixed token position, over many samples
        res = stats.kstest(dual.tau[:, token].double().numpy(), lambda v: dist.cdf(torch.as_tensor(v)).numpy())
        assert res.pvalue > 1e-3


def test_mask_counts_are_exact_and_positions_random():
    m = exact_count_mask(500, 64, 0.1, torch.Generator().manual_seed(0))
    assert (m.sum(1) == round(0.1 * 64)).all()
    freq = m.float().mean(0)
    assert freq.min() > 0.03 and freq.max() < 0.2  # every position gets masked sometimes
    assert not exact_count_mask(3, 10, 0.0).any() and exact_count_mask(3, 10, 1.0).all()
    with pytest.raises(ValueError):
        exact_count_mask(1, 4, 1.5)


def test_unsorted_levels_tau_and_tau_min():
    dual = sample_dual_timesteps(2000, 8, TimestepDistribution(), 0.5, torch.Generator().manual_seed(2))
    assert (dual.s < dual.t).float().mean().item() == pytest.approx(0.5, abs=0.05)  # s not always cleaner
    assert torch.equal(dual.tau_min, torch.minimum(dual.t, dual.s))
    assert torch.equal(dual.tau[dual.mask], dual.s[:, None].expand(-1, 8)[dual.mask])
    assert torch.equal(dual.token_timesteps().dense(), dual.tau)
