from types import SimpleNamespace

import torch
from torch import nn

from selfflow.core.codec import NormalizedVAE


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
