import pytest
import torch

from selfflow.image import toy_encoder
from selfflow.image.modality import ImageModality
from selfflow.image.toy_encoder import ToyEncoderNet, ToyRepaEncoder


@pytest.fixture(autouse=True)
def quick_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFFLOW_CACHE", str(tmp_path))
    monkeypatch.setattr(toy_encoder, "TRAIN_STEPS", 5)


def test_net_pools_down_to_the_token_grid():
    net = ToyEncoderNet(32, 8, 10, dim=16)
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 16, 8, 8)
    with pytest.raises(ValueError, match="power of two"):
        ToyEncoderNet(24, 8, 10)


def test_features_have_the_token_grid_shape_and_are_cached(tmp_path):
    enc = ToyRepaEncoder("digits", 16, 8, 10, dim=32)
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    feats = enc(images)
    assert feats.shape == (3, 64, 32)
    assert not any(p.requires_grad for p in enc.net.parameters())
    assert len(list(tmp_path.glob("toy_repa_*.pt"))) == 1
    assert torch.equal(ToyRepaEncoder("digits", 16, 8, 10, dim=32)(images), feats)  # loaded, same weights
    ToyRepaEncoder("digits", 16, 8, 10, dim=32, data_seed=1)
    assert len(list(tmp_path.glob("toy_repa_*.pt"))) == 2  # the data order is part of the cache key
    with pytest.raises(ValueError, match="'latent_shards'"):
        ToyRepaEncoder("latent_shards", 16, 8, 10)


def test_the_modality_sets_toy_targets_per_token(tiny_vae_dir):
    mod = ImageModality({"dataset": "synthetic_shapes", "image_size": 16, "patch_size": 2, "repa_encoder": "toy",
                         "toy_repa_dim": 24})
    tokens, _ = mod.encode(next(iter(mod.stream(2, 0))), "cpu")
    assert tokens.target.shape == (2, 64, 24)
    with pytest.raises(ValueError, match="repa_encoder: toy needs a built-in dataset"):
        ImageModality({"dataset": "digits", "codec": "sd_vae", "vae_path": str(tiny_vae_dir),
                       "repa_encoder": "toy"})
