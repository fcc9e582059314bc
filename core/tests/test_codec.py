from types import SimpleNamespace

import pytest
import torch
from torch import nn

from selfflow.core.codec import (
    CodecShape,
    NormalizedVAE,
    shapes_only,
    shapes_only_active,
    stands_in,
)


class _ScaleVAE(nn.Module):
    """A stand-in autoencoder: the latent is the input halved, decoding doubles it."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def encode(self, x):
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=x * 0.5 * self.w))

    def decode(self, z):
        return SimpleNamespace(sample=z * 2 * self.w)


def test_normalized_vae_normalises_per_channel_and_inverts_it_on_decode():
    mean, std = torch.tensor([0.1, -0.2]).view(1, 2, 1), torch.tensor([2.0, 0.5]).view(1, 2, 1)
    codec = NormalizedVAE(_ScaleVAE(), mean, std)
    x = torch.rand(3, 2, 8) * 1.6 - 0.8
    z = codec.encode(x)
    assert torch.equal(codec.encode_raw(x), x * 0.5)
    assert torch.allclose(z, (x * 0.5 - mean) / std)
    assert torch.allclose(codec.decode(z), x, atol=1e-6)
    assert codec.decode(z * 0 + 10).max() == 1  # decoded media are clamped to [-1, 1]
    assert not codec.vae.training and not codec.vae.w.requires_grad  # frozen
    assert {n for n, _ in codec.named_buffers()} == {"mean", "std"}  # .to(device) moves the statistics


def test_stands_in_only_under_shapes_only_and_only_for_an_absent_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert not stands_in(tmp_path / "missing") and not shapes_only_active()  # loaders read (and fail) as always
    with shapes_only():
        assert shapes_only_active()
        assert stands_in(tmp_path / "missing") and stands_in(None)
        assert not stands_in(tmp_path)  # a present folder is read even when planning
        assert stands_in(tmp_path, "codec.json")
    assert not shapes_only_active()


def test_a_codec_shape_sizes_tokens_but_refuses_to_encode_or_decode():
    shape = CodecShape("SD-VAE", latent_channels=4, downsample=8)
    assert (shape.latent_channels, shape.downsample) == (4, 8)
    with pytest.raises(RuntimeError, match="SD-VAE: only its shape is known"):
        shape.encode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(RuntimeError, match="to decode"):
        shape.decode(torch.zeros(1, 4, 1, 1))
