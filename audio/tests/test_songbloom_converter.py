"""The converter against a stable-audio-tools-layout reference network (written here from the layout
described in the module docstring; same random weights on both sides)."""

import math

import pytest
import torch
from torch import nn
from torch.nn.utils import weight_norm

from selfflow.audio.songbloom import convert_state_dict, diffusers_config


class Snake(nn.Module):  # SnakeBeta with log-scale parameters of shape (C,)
    def __init__(self, c):
        super().__init__()
        self.alpha, self.beta = nn.Parameter(torch.randn(c) * 0.3), nn.Parameter(torch.randn(c) * 0.3)

    def forward(self, x):
        a, b = self.alpha.exp()[None, :, None], self.beta.exp()[None, :, None]
        return x + torch.sin(x * a).pow(2) / (b + 1e-9)


def conv(*a, **k):
    return weight_norm(nn.Conv1d(*a, **k))


class Unit(nn.Module):
    def __init__(self, c, d):
        super().__init__()
        self.layers = nn.Sequential(Snake(c), conv(c, c, 7, dilation=d, padding=3 * d), Snake(c), conv(c, c, 1))

    def forward(self, x):
        return x + self.layers(x)


class Block(nn.Module):
    def __init__(self, cin, cout, s, decoder):
        super().__init__()
        if decoder:
            up = weight_norm(nn.ConvTranspose1d(cin, cout, 2 * s, stride=s, padding=math.ceil(s / 2)))
            self.layers = nn.Sequential(Snake(cin), up, Unit(cout, 1), Unit(cout, 3), Unit(cout, 9))
        else:
            self.layers = nn.Sequential(Unit(cin, 1), Unit(cin, 3), Unit(cin, 9), Snake(cin),
                                        conv(cin, cout, 2 * s, stride=s, padding=math.ceil(s / 2)))

    def forward(self, x):
        return self.layers(x)


class Coder(nn.Module):
    def __init__(self, io, ch, latent, mults, strides, decoder):
        super().__init__()
        m = [1, *mults]
        if decoder:
            layers = [conv(latent, m[-1] * ch, 7, padding=3)]
            layers += [Block(m[i] * ch, m[i - 1] * ch, strides[i - 1], True) for i in range(len(m) - 1, 0, -1)]
            layers += [Snake(ch), conv(ch, io, 7, padding=3, bias=False)]
        else:
            layers = [conv(io, ch, 7, padding=3)]
            layers += [Block(m[i] * ch, m[i + 1] * ch, strides[i], False) for i in range(len(m) - 1)]
            layers += [Snake(m[-1] * ch), conv(m[-1] * ch, latent, 3, padding=1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


SAT = {"sample_rate": 48000, "model": {
    "encoder": {"type": "oobleck", "config": {"in_channels": 2, "channels": 8, "c_mults": [1, 2, 2],
                                              "strides": [2, 4, 6], "latent_dim": 8, "use_snake": True}},
    "decoder": {"type": "oobleck", "config": {"out_channels": 2, "channels": 8, "c_mults": [1, 2, 2],
                                              "strides": [2, 4, 6], "latent_dim": 4, "use_snake": True,
                                              "final_tanh": False}},
    "bottleneck": {"type": "vae"}, "latent_dim": 4, "downsampling_ratio": 48, "io_channels": 2}}


def test_converted_weights_reproduce_the_reference_within_1e5():
    from diffusers import AutoencoderOobleck

    torch.manual_seed(0)
    enc = Coder(2, 8, 8, [1, 2, 2], [2, 4, 6], decoder=False).eval()
    dec = Coder(2, 8, 4, [1, 2, 2], [2, 4, 6], decoder=True).eval()
    sd = {**{f"encoder.{k}": v for k, v in enc.state_dict().items()},
          **{f"decoder.{k}": v for k, v in dec.state_dict().items()}}
    cfg = diffusers_config(SAT)
    vae = AutoencoderOobleck(**cfg).eval()
    converted = convert_state_dict({f"autoencoder.{k}": v for k, v in sd.items()}, n_blocks=3)
    vae.load_state_dict(converted, strict=True)
    x = torch.randn(2, 2, 480) * 0.5
    with torch.no_grad():
        h = enc(x)
        mean, scale = h.chunk(2, dim=1)
        dist = vae.encode(x).latent_dist
        assert mean.shape == (2, 4, 10)
        assert (dist.mean - mean).abs().max() < 1e-5
        assert (dist.std - (nn.functional.softplus(scale) + 1e-4)).abs().max() < 1e-5
        assert (vae.decode(mean).sample - dec(mean)).abs().max() < 1e-5


@pytest.mark.parametrize(("side", "key", "value", "message"), [
    ("decoder", "final_tanh", True, "final_tanh"), ("encoder", "use_snake", False, "use_snake"),
    ("encoder", "latent_dim", 16, "latent_dim == channels")])
def test_config_flags_diffusers_cannot_host_are_refused(side, key, value, message):
    bad = {"sample_rate": 48000, "model": {k: dict(v) for k, v in SAT["model"].items() if isinstance(v, dict)}}
    bad["model"][side] = {**bad["model"][side], "config": {**bad["model"][side]["config"], key: value}}
    with pytest.raises(ValueError, match=message):
        diffusers_config(bad)
