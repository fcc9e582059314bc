from types import SimpleNamespace

import pytest
import torch
from torch import nn

from selfflow.core.block_walk import BlockWalk, check_layers


class CountingBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.calls = 0

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return h + self.lin(h)


def _model(projector=None, checkpointing=False):
    return SimpleNamespace(depth=3, projector=projector, activation_checkpointing=checkpointing)


def _walk_through(walk: BlockWalk, blocks, h: torch.Tensor, n_context: int = 0):
    for block in blocks:
        h = walk(block, h)
        if walk.finished(h, n_context):
            return walk.stopped()
    return walk.output(h)


@pytest.mark.parametrize("capture,stop_after", [((0,), None), ((4,), None), ((), 0), ((1,), 4)])
def test_layers_outside_one_to_depth_are_rejected(capture, stop_after):
    with pytest.raises(ValueError, match=r"block \d is out of range 1\.\.3"):
        check_layers(3, capture, stop_after)


def test_captures_data_tokens_and_stops_early():
    blocks = [CountingBlock() for _ in range(3)]
    h = torch.randn(2, 5, 4)  # 2 context tokens, 3 data tokens
    assert torch.equal(_walk_through(BlockWalk(_model(), (), None, False), blocks, h, 2), blocks[2](
        blocks[1](blocks[0](h))))
    out, feats = _walk_through(BlockWalk(_model(), (1, 3), None, False), blocks, h, n_context=2)
    assert set(feats) == {1, 3} and torch.equal(feats[1], blocks[0](h)[:, 2:]) and torch.equal(feats[3], out[:, 2:])
    for b in blocks:
        b.calls = 0
    none, early = _walk_through(BlockWalk(_model(), (2,), 2, False), blocks, h)
    assert none is None and set(early) == {2} and [b.calls for b in blocks] == [1, 1, 0]


def test_projects_captures_only_when_asked():
    blocks = [CountingBlock() for _ in range(3)]
    projector = nn.Linear(4, 6)
    h = torch.randn(2, 3, 4)
    _, raw = _walk_through(BlockWalk(_model(projector), (2,), 2, False), blocks, h)
    _, projected = _walk_through(BlockWalk(_model(projector), (2,), 2, True), blocks, h)
    assert torch.equal(projected[2], projector(raw[2]))
    with pytest.raises(RuntimeError, match="projector_mult"):
        _walk_through(BlockWalk(_model(), (2,), 2, True), blocks, h)


def test_activation_checkpointing_recomputes_blocks_with_the_same_gradients():
    blocks = [CountingBlock() for _ in range(3)]
    h = torch.randn(2, 3, 4)
    grads = []
    for checkpointing in (False, True):
        for b in blocks:
            b.zero_grad()
            b.calls = 0
        _walk_through(BlockWalk(_model(checkpointing=checkpointing), (), None, False), blocks, h).sum().backward()
        grads.append([b.lin.weight.grad.clone() for b in blocks])
        assert [b.calls for b in blocks] == [2 if checkpointing else 1] * 3
    assert all(torch.equal(a, b) for a, b in zip(*grads))
