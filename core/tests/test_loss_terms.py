import pytest
import torch
import torch.nn.functional as F

from selfflow.core.loss_terms import alignment_loss, flow_matching_loss, token_mse


def test_plain_flow_matching_is_exactly_mse_loss():
    pred, target = torch.randn(3, 5, 4, dtype=torch.bfloat16), torch.randn(3, 5, 4)
    loss, groups = flow_matching_loss(pred, target)
    assert torch.equal(loss, F.mse_loss(pred.float(), target)) and groups == {}


def test_weighted_flow_matching_sums_weights_times_token_errors():
    pred, target = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    uniform = torch.full((2, 5), 1 / 10)
    loss, _ = flow_matching_loss(pred, target, uniform)
    assert torch.allclose(loss, F.mse_loss(pred, target))
    half = torch.zeros(2, 5)
    half[:, :2] = 1.0
    loss, groups = flow_matching_loss(pred, target, half, group_weight={"first": half * 2})
    err = ((pred - target) ** 2).mean(-1)
    assert torch.allclose(loss, err[:, :2].sum()) and torch.allclose(groups["loss_fm_first"], 2 * err[:, :2].sum())


def test_token_mse_covers_content_channels_only():
    pred, target = torch.zeros(1, 2, 4), torch.ones(1, 2, 4)
    pred[0, 1, 2:] = 1  # padding channels of token 1 match; its content (2 channels) is off by 1
    channels = torch.tensor([[True] * 4, [True, True, False, False]])
    assert torch.equal(token_mse(pred, target, channels), torch.tensor([[1.0, 1.0]]))


def test_alignment_is_minus_cosine_and_checks_shapes():
    feats = torch.randn(2, 5, 8)
    assert torch.allclose(alignment_loss(feats, 3 * feats), torch.tensor(-1.0))
    weight = torch.zeros(2, 5)
    weight[0, 0] = 1.0
    assert torch.allclose(alignment_loss(feats, -feats, weight), torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"projected features \(2, 5, 8\) do not match"):
        alignment_loss(feats, torch.randn(2, 5, 6))


def test_alignment_l2_is_the_channel_mean_squared_difference():
    feats, target = torch.zeros(1, 2, 4), torch.ones(1, 2, 4)
    target[0, 1] = 3.0  # token errors 1 and 9
    assert torch.allclose(alignment_loss(feats, target, distance="l2"), torch.tensor(5.0))
    assert torch.allclose(alignment_loss(feats, target, torch.tensor([[0.25, 0.75]]), "l2"), torch.tensor(7.0))
    with pytest.raises(ValueError, match="alignment distance must be 'cosine' or 'l2', got 'l1'"):
        alignment_loss(feats, target, distance="l1")


def test_flow_matching_refuses_shapes_that_would_broadcast():
    """(B, L, C) against (B, 1, C) or (L, C) used to broadcast with only a warning (unweighted) or silently."""
    pred = torch.randn(2, 5, 4)
    for target in (torch.randn(2, 1, 4), torch.randn(5, 4)):
        with pytest.raises(ValueError, match=r"velocity prediction \(2, 5, 4\) does not match its target"):
            flow_matching_loss(pred, target)
    with pytest.raises(ValueError, match=r"per-token weights \(2, 1\) do not match the tokens \(2, 5\)"):
        flow_matching_loss(pred, torch.randn(2, 5, 4), torch.ones(2, 1))
