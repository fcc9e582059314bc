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
