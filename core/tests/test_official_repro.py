"""``--official-repro``: the official sample.py's batch seeds, global-generator Brownian noise, bf16 autocast
and uint8 truncation, checked against a loop written out from the reference notes (training-anchors §1.5)."""

import warnings

import numpy as np
import pytest
import torch
from einops import rearrange
from torch import nn

from selfflow.core.config import ConfigError
from selfflow.core.distributed import DistInfo
from selfflow.core.official_repro import (
    SeededBatch,
    official_batches,
    official_generate_batch,
    official_noise,
    truncate_uint8,
)
from selfflow.core.sample_many import SampleManyConfig, plan_batches, sample_many
from selfflow.core.sampler import SamplerConfig
from selfflow.core.tokens import Conditioning, grid_ids, patchify

K, C, S, P = 5, 4, 8, 2  # classes, latent channels, latent size, patch


class _Vae:
    latent_channels = C


class _Codec:
    vae, latent_size = _Vae(), S

    def latents_to_tokens(self, latents):
        return patchify(latents.unsqueeze(2), (1, P, P))


class LatentModality:
    """An SD-VAE-like image modality: (B, 4, 8, 8) latents, patch 2, "decoder" tanh of 3 channels."""

    name, num_classes, codec = "image", K, _Codec()

    def sample_ids(self, n, device):
        return grid_ids(1, S // P, S // P, n, device)

    def decode(self, x):
        latents = rearrange(x, "b (h w) (c p1 p2) -> b c (h p1) (w p2)", h=S // P, p1=P, p2=P)
        return torch.tanh(2 * latents[:, :3])


class TinyModel(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.lin = nn.Linear(C * P * P, C * P * P)
        self.emb = nn.Embedding(K + 1, C * P * P)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.3

    def forward(self, x, ids, t, cond, modality=None):
        return self.lin(x) * t[:, None, None] + self.emb(cond.labels)[:, None, :]


def official_loop(model, n, seed, cfg_scale, steps=8, interval=(0.0, 0.7)):
    """The official per-batch loop, from the notes: manual_seed per batch, labels then bf16 noise on the
    device, SiT Euler–Maruyama in SiT time s with ``torch.randn(x.size())`` (the global generator) over the
    doubled [null; cond] batch re-synced to its conditional half each step, a 0.04 mean last step, bf16
    autocast, and ``astype(uint8)`` of ``(x + 1)/2 · 255``."""
    torch.manual_seed(seed)
    labels = torch.randint(0, K, (n,))
    z = torch.randn(n, C, S, S, dtype=torch.bfloat16).float()
    x = rearrange(z, "b c (h p1) (w p2) -> b (h w) (c p1 p2)", p1=P, p2=P)
    ids = grid_ids(1, S // P, S // P, n)
    guided = cfg_scale > 1
    y = torch.cat([torch.full_like(labels, K), labels]) if guided else labels
    if guided:
        x = torch.cat([x, x])
        ids = torch.cat([ids, ids])
    s_grid = torch.linspace(0, 0.96, steps)
    dt = s_grid[1] - s_grid[0]

    def sit_drift(x, s):
        t_rf = torch.full((x.shape[0],), 1 - float(s))
        v = model(x, ids, t_rf, Conditioning(labels=y))
        if guided and interval[0] <= float(t_rf[0]) <= interval[1]:
            v_u, v_c = v.chunk(2)
            v = torch.cat([v_u + cfg_scale * (v_c - v_u)] * 2)
        elif guided:
            v = torch.cat([v.chunk(2)[1]] * 2)  # outside the interval: the conditional velocity
        v = -v  # SiT velocity
        sigma = 1 - s
        score = (s * v - x) / (sigma**2 + s * sigma)
        return v + sigma * score

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for s in s_grid[:-1]:
            w = torch.randn(x.size())
            x = x + sit_drift(x, s) * dt.item() + torch.sqrt(2 * (1 - s)) * w * dt.sqrt().item()
            if guided:
                x = torch.cat([x[n:], x[n:]])
        x = x + sit_drift(x, s_grid[-1]) * 0.04
        images = LatentModality().decode(x[-n:].float())
    arr = (((images + 1) / 2).clamp(0, 1) * 255).permute(0, 2, 3, 1).numpy().astype(np.uint8)
    return arr, labels


def test_batches_and_seeds_of_an_official_run():
    # 10 samples on 2 GPUs, batch 3: each rank makes ceil(10/2) = 5 in batches of 3 + 2
    plan = official_batches(10, 3, 2, seed=31)
    assert [(b.indices, b.seed) for b in plan] == [
        ([0, 1, 2], 31), ([3, 4], 32), ([5, 6, 7], 100_031), ([8, 9], 100_032)]
    # 9 samples on 2 GPUs: rank 1 still makes 5; the npz keeps the first 9
    assert official_batches(9, 3, 2, seed=31)[-1].indices == [8, 9]
    opts = SampleManyConfig(num=10, batch_size=3, out_dir="x", seed=7, official_repro=True, official_world_size=2)
    assert plan_batches(opts, world_size=3) == official_batches(10, 3, 2, seed=7)  # the official W, not ours
    mine = plan_batches(opts, world_size=3)[1::3]  # our rank 1 of 3 draws batch 1: official rank 0's second
    assert [(b.indices, b.seed) for b in mine] == [([3, 4], 8)]
    default = plan_batches(SampleManyConfig(num=7, batch_size=3, out_dir="x"), world_size=2)
    assert [b.indices for b in default] == [[0, 1, 2], [3, 4, 5], [6]]  # ours: fixed chunks of the index space


def test_truncation_differs_from_rounding():
    x = torch.tensor([-1.0, 1.0, 2 * 10.7 / 255 - 1, 2 * 200.5 / 255 - 1, 1.5]).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    out = truncate_uint8(x)
    assert out.shape == (1, 1, 5, 3) and out.dtype == np.uint8
    assert out[0, 0, :, 0].tolist() == [0, 255, 10, 200, 255]
    rounded = ((x + 1) * 127.5).round().clamp(0, 255)[0, 0, 0].tolist()
    assert rounded == [0, 255, 11, 201, 255]  # our default quantisation differs exactly there


@pytest.mark.parametrize("cfg_scale", [1.0, 1.5])
def test_official_batch_equals_the_written_out_official_loop(cfg_scale):
    model = TinyModel().eval()
    sampler = SamplerConfig(solver="sde", steps=8, cfg_scale=cfg_scale, guidance_interval=(0.0, 0.7))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bf16 on the CPU
        ours, labels = official_generate_batch(model, LatentModality(), sampler, SeededBatch([0, 1, 2], 131),
                                               torch.device("cpu"))
        ref, ref_labels = official_loop(model, 3, 131, cfg_scale)
        torch.manual_seed(0)  # a different global state before the batch changes nothing: it reseeds
        again, _ = official_generate_batch(model, LatentModality(), sampler, SeededBatch([0, 1, 2], 131),
                                           torch.device("cpu"))
        other, _ = official_generate_batch(model, LatentModality(), sampler, SeededBatch([0, 1, 2], 132),
                                           torch.device("cpu"))
    assert torch.equal(labels, ref_labels)
    assert np.array_equal(ours, ref)
    assert np.array_equal(ours, again) and not np.array_equal(ours, other)


def test_brownian_noise_comes_from_the_global_generator(monkeypatch):
    model = TinyModel().eval()
    draws = []
    real = torch.randn

    def spy(*args, **kw):
        draws.append(kw.get("generator"))
        return real(*args, **kw)

    monkeypatch.setattr(torch, "randn", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        official_generate_batch(model, LatentModality(), SamplerConfig(solver="sde", steps=5),
                                SeededBatch([0, 1], 3), torch.device("cpu"))
    assert len(draws) == 1 + 4  # the initial noise, then one Brownian draw per stochastic step
    assert draws[0] is None and all(g is torch.default_generator for g in draws[1:])


def test_sample_many_writes_the_official_npz_and_pngs(tmp_path):
    from PIL import Image

    model = TinyModel().eval()
    sampler = SamplerConfig(solver="sde", steps=4)
    opts = SampleManyConfig(num=5, batch_size=2, out_dir=tmp_path, seed=31, official_repro=True,
                            official_world_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        npz = sample_many(model, LatentModality(), sampler, opts, DistInfo(), progress=False)
        parts = [official_generate_batch(model, LatentModality(), sampler, b, torch.device("cpu"))[0]
                 for b in official_batches(5, 2, 2, 31)]
    arr = np.load(npz)["arr_0"]
    assert arr.shape == (5, S, S, 3)
    assert np.array_equal(arr, np.concatenate(parts)[:5])  # rank 1's 6th sample is made, then cut
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [f"{i:06d}.png" for i in range(5)]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "000004.png")), arr[4])


def test_official_repro_needs_a_latent_class_conditional_modality():
    class Audio:
        name, num_classes = "audio", 3

    with pytest.raises(ConfigError, match="latent image modality"):
        official_noise(Audio(), 2, "cpu")


def test_cli_flags(capsys):
    from selfflow.core.cli import build_parser, main

    args = build_parser().parse_args(["sample", "--official-ckpt", "c.pt", "--out-dir", "o", "--official-repro",
                                      "--official-world-size", "8", "--precision", "bf16"])
    assert args.official_repro and args.official_world_size == 8 and args.precision == "bf16" and args.seed is None
    assert main(["sample", "--run", "r", "--official-repro"]) == 2
    assert "--official-repro writes many samples" in capsys.readouterr().err
