"""The benchmarks' training step: with ``host_reads`` it reads what the trainer reads, and trains the same."""

from unittest import mock

import torch

from benchmarks.dit_bench import _model
from benchmarks.train_step import make_train_step
from selfflow.core.ema import make_ema
from selfflow.core.objective import ObjectiveConfig
from selfflow.core.timesteps import TimestepDistribution
from selfflow.core.tokens import Conditioning, Tokens, grid_ids


def _trained(host_reads: bool, monkeypatch) -> tuple[list[str], list[torch.Tensor]]:
    reads = []
    clip = torch.nn.utils.clip_grad_norm_

    def recorded_clip(*args, **kwargs):  # its norm, as an object that notes when the host reads it
        norm = clip(*args, **kwargs)
        return mock.Mock(__float__=lambda _self: reads.append("grad_norm") or float(norm))

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recorded_clip)
    model = _model("tiny")
    ema = make_ema(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    obj = ObjectiveConfig(kind="self_flow").resolve(model.depth, 0.25, TimestepDistribution())
    tokens = Tokens(torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(1)), grid_ids(1, 4, 4, 2))
    step = make_train_step(model, ema, opt, tokens, Conditioning(labels=torch.arange(2)), obj, null_label=1000,
                           host_reads=host_reads)
    for _ in range(2):
        step()
    return reads, [p.detach().clone() for p in model.parameters()]


def test_host_reads_read_the_grad_norm_and_change_nothing_else(monkeypatch):
    reads, params = _trained(True, monkeypatch)
    no_reads, params_without = _trained(False, monkeypatch)
    assert reads == ["grad_norm"] * 2 and no_reads == []
    assert all(torch.equal(a, b) for a, b in zip(params, params_without, strict=True))
