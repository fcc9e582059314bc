import pytest
import torch

from selfflow.core.mmdit import MMDiT, MMDiTConfig


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_gloo_rank(tmp_path):
    """A process group of one gloo rank in this process, for DDP and FSDP2 wrapping without torchrun."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def tiny_config(**kw) -> MMDiTConfig:
    base = dict(hidden_size=64, num_heads=4, depth_double=2, depth_single=2, axes_dim=(4, 6, 6),
                num_classes=5, modalities={"img": 12})
    base.update(kw)
    return MMDiTConfig(**base)


def randomize(model: MMDiT) -> MMDiT:
    """Give zero-initialised layers (gates, outputs) random values so every path is exercised."""
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return model


def assert_compiled_blocks_match_eager(model: torch.nn.Module, inputs: tuple, cond, layer: int) -> None:
    """A copy of ``model`` with every block compiled whole (``fullgraph``: no graph break) gives the values and
    gradients of ``model`` eager, for a Self-Flow forward (two levels per sample, block ``layer`` captured)."""
    import copy

    from selfflow.core.modulation import TokenTimesteps

    compiled = copy.deepcopy(model)
    for block in compiled.blocks():
        block.compile(fullgraph=True)
    x, ids = inputs
    tt = TokenTimesteps.from_levels(torch.rand(x.shape[0], 2), (torch.rand(x.shape[:2]) < 0.3).long())
    outs = []
    for m in (model, compiled):
        pred, feats = m(x, ids, tt, cond, capture=(layer,), project=True)
        (pred.square().mean() + feats[layer].square().mean()).backward()
        outs.append((pred, [p.grad for p in m.parameters() if p.grad is not None]))
    (pred_e, grads_e), (pred_c, grads_c) = outs
    torch.testing.assert_close(pred_c, pred_e, rtol=1e-5, atol=1e-5)
    assert len(grads_c) == len(grads_e)
    for g_c, g_e in zip(grads_c, grads_e, strict=True):
        torch.testing.assert_close(g_c, g_e, rtol=1e-4, atol=1e-5)
