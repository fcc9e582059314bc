"""Shared fixtures: a random FID-Inception state_dict in the layout of the published weight file."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def random_inception_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """torchvision's Inception3 layout (no AuxLogits, 1008 classes) with sane random weights.

    Built from torchvision (not our module) so that a key-name mistake on our side shows up.
    BatchNorm buffers are randomised and convs use a variance-preserving init, so features neither
    vanish nor explode and comparisons are not trivially satisfied.
    """
    from torchvision.models.inception import Inception3

    g = torch.Generator().manual_seed(seed)
    net = Inception3(num_classes=1008, aux_logits=False, init_weights=False, transform_input=False)
    sd = {}
    for k, v in net.state_dict().items():
        if k.endswith("num_batches_tracked"):
            continue
        if k.endswith("conv.weight"):
            fan_in = v[0].numel()
            v = torch.randn(v.shape, generator=g) * math.sqrt(2.0 / fan_in)
        elif k.endswith("bn.weight"):
            v = 0.8 + 0.4 * torch.rand(v.shape, generator=g)
        elif k.endswith("bn.bias"):
            v = 0.05 * torch.randn(v.shape, generator=g)
        elif k.endswith("running_mean"):
            v = 0.1 * torch.randn(v.shape, generator=g)
        elif k.endswith("running_var"):
            v = 0.5 + torch.rand(v.shape, generator=g)
        elif k == "fc.weight":
            v = torch.randn(v.shape, generator=g) / math.sqrt(v.shape[1]) * 4
        elif k == "fc.bias":
            v = torch.randn(v.shape, generator=g)
        sd[k] = v.contiguous()
    return sd


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(random_inception_state_dict(), path)
    return path


@pytest.fixture(scope="session")
def inception_model(inception_weights: Path):
    from selfflow.eval.inception import load_inception

    return load_inception(inception_weights)


def smooth_images(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """Seeded uint8 (n, h, w, 3) images: upsampled noise plus edges, so resizes are non-trivial."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.uniform(0, 255, size=(n, 3, max(h // 8, 2), max(w // 8, 2))).astype(np.float32))
    x = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)
    x = x + torch.from_numpy(rng.normal(0, 12, size=(n, 3, h, w)).astype(np.float32))
    x[:, :, h // 3: h // 3 + max(h // 10, 1), :] = 255.0  # a hard edge
    return x.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


@pytest.fixture(scope="session")
def make_images():
    return smooth_images
