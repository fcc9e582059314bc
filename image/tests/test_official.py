"""The official checkpoint layout loads strictly, and our forward equals the official forward semantics."""

import math

import pytest
import torch
import torch.nn.functional as F

from selfflow.core.tokens import grid_ids
from selfflow.image.official import (
    convert_sit_checkpoint,
    load_converted,
    load_official_selfflow,
    official_config,
)


def official_key_table(d=1152, depth=28, classes=1001, mlp=4608, out=32, proj=2304, tokens=256, ch=16):
    """The documented ``SelfFlowPerTokenDiT`` state dict (training-anchors §1.4), written out by hand."""
    table = {"pos_embed": (1, tokens, d), "x_embedder.proj.weight": (d, ch), "x_embedder.proj.bias": (d,),
             "t_embedder.mlp.0.weight": (d, 256), "t_embedder.mlp.0.bias": (d,),
             "t_embedder.mlp.2.weight": (d, d), "t_embedder.mlp.2.bias": (d,),
             "y_embedder.embedding_table.weight": (classes, d)}
    for i in range(depth):
        table |= {f"blocks.{i}.attn.qkv.weight": (3 * d, d), f"blocks.{i}.attn.qkv.bias": (3 * d,),
                  f"blocks.{i}.attn.proj.weight": (d, d), f"blocks.{i}.attn.proj.bias": (d,),
                  f"blocks.{i}.mlp.fc1.weight": (mlp, d), f"blocks.{i}.mlp.fc1.bias": (mlp,),
                  f"blocks.{i}.mlp.fc2.weight": (d, mlp), f"blocks.{i}.mlp.fc2.bias": (d,),
                  f"blocks.{i}.adaLN_modulation.1.weight": (6 * d, d),
                  f"blocks.{i}.adaLN_modulation.1.bias": (6 * d,)}
    table |= {"final_layer.linear.weight": (out, d), "final_layer.linear.bias": (out,),
              "final_layer.adaLN_modulation.1.weight": (2 * d, d), "final_layer.adaLN_modulation.1.bias": (2 * d,),
              "projector.linear1.weight": (proj, d), "projector.linear1.bias": (proj,),
              "projector.linear2.weight": (d, proj), "projector.linear2.bias": (d,)}
    return table


def cheap_state(table):
    """One stored number per tensor (a stride-0 view): an XL/2-shaped file of a few kilobytes."""
    return {k: torch.randn(1).expand(shape) for k, shape in table.items()}


def test_xl2_key_table_loads_strictly(tmp_path):
    table = official_key_table()
    assert len(table) == 296 and sum(math.prod(s) for s in table.values()) == 680_441_504
    path = tmp_path / "selfflow_xl2.pt"
    torch.save({"model": cheap_state(table)}, path)
    model = load_official_selfflow(path)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == table
    assert not model.pos_embed.requires_grad

    for broken, needle in (
        ({k: v for k, v in cheap_state(table).items() if k != "blocks.27.mlp.fc2.bias"},
         "missing key blocks.27.mlp.fc2.bias"),
        ({**cheap_state(table), "blocks.28.attn.qkv.weight": torch.zeros(1)}, "unexpected key blocks.28.attn.qkv.weight"),
        ({**cheap_state(table), "y_embedder.embedding_table.weight": torch.zeros(1000, 1152)},
         "wrong shape y_embedder.embedding_table.weight"),
    ):
        bad = tmp_path / "bad.pt"
        torch.save(broken, bad)
        with pytest.raises(ValueError, match=needle.replace(".", r"\.")) as e:
            load_official_selfflow(bad)
        assert str(bad) in str(e.value)


SMALL = dict(hidden_size=64, num_heads=4, depth=3, num_classes=1000)


def random_official_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    table = official_key_table(d=64, depth=3, mlp=256, proj=128)
    return {k: torch.randn(shape, generator=g) * (0.02 if k == "pos_embed" else 1 / math.sqrt(shape[-1]))
            for k, shape in table.items()}


def reference_forward(sd, x, timesteps, labels, heads=4, depth=3, patch=2):
    """The official forward from its documented semantics (training-anchors §1.1-1.3), per token, plainly."""
    b, n, _ = x.shape
    t = 1 - (timesteps[:, None].expand(b, n) if timesteps.ndim == 1 else timesteps)  # SiT time per token
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t.reshape(-1, 1).float() * freqs
    emb = torch.cat([torch.cos(args), torch.sin(args)], -1)  # (B·L, 256)

    def lin(h, name):
        return h @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]

    temb = lin(F.silu(lin(emb, "t_embedder.mlp.0")), "t_embedder.mlp.2").reshape(b, n, -1)
    c = temb + sd["y_embedder.embedding_table.weight"][labels][:, None, :]  # (B, L, D) per token
    h = lin(x, "x_embedder.proj") + sd["pos_embed"]
    d = h.shape[-1]
    for i in range(depth):
        p = f"blocks.{i}"
        mods = lin(F.silu(c), f"{p}.adaLN_modulation.1")  # a Linear on every token's conditioning
        sh1, sc1, g1, sh2, sc2, g2 = mods.split(d, dim=-1)
        a = F.layer_norm(h, (d,), eps=1e-6) * (1 + sc1) + sh1
        q, k, v = lin(a, f"{p}.attn.qkv").reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1) @ v
        h = h + g1 * lin(att.transpose(1, 2).reshape(b, n, d), f"{p}.attn.proj")
        m = F.layer_norm(h, (d,), eps=1e-6) * (1 + sc2) + sh2
        h = h + g2 * lin(F.gelu(lin(m, f"{p}.mlp.fc1"), approximate="tanh"), f"{p}.mlp.fc2")
    sh, sc = lin(F.silu(c), "final_layer.adaLN_modulation.1").split(d, dim=-1)
    out = lin(F.layer_norm(h, (d,), eps=1e-6) * (1 + sc) + sh, "final_layer.linear")  # (B, L, p·q·8)
    out = out.reshape(b, n, patch, patch, -1).permute(0, 1, 4, 2, 3).reshape(b, n, -1)  # (p q c) → (c p q)
    return -out[..., : out.shape[-1] // 2]  # drop the sigma half, negate (SiT → RF velocity)


@pytest.mark.parametrize("per_token", [False, True])
def test_forward_equals_the_official_semantics(tmp_path, per_token):
    sd = random_official_state()
    path = tmp_path / "small.pt"
    torch.save({"module.ema": None, "state_dict": {f"module._orig_mod.{k}": v for k, v in sd.items()}}, path)
    model = load_official_selfflow(path, config=official_config(**SMALL))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 256, 16, generator=g)
    labels = torch.tensor([3, 1000])
    if per_token:
        t, s = torch.rand(2, generator=g), torch.rand(2, generator=g)
        t = torch.where(torch.rand(2, 256, generator=g) < 0.25, s[:, None], t[:, None])
    else:
        t = torch.rand(2, generator=g)
    with torch.no_grad():
        ours = model(x, grid_ids(1, 16, 16, 2), t, labels)
        ref = reference_forward(sd, x, t, labels)
    assert ours.shape == (2, 256, 16)
    assert (ours - ref).abs().max() < 1e-5


def test_wrappers_ema_preferred_and_sit_conversion(tmp_path):
    sd = random_official_state(0)
    other = random_official_state(1)
    torch.save({"model": other, "ema": sd}, tmp_path / "both.pt")
    model = load_official_selfflow(tmp_path / "both.pt", config=official_config(**SMALL))
    assert torch.equal(model.state_dict()["blocks.0.attn.qkv.weight"], sd["blocks.0.attn.qkv.weight"])
    model = load_official_selfflow(tmp_path / "both.pt", weights="model", config=official_config(**SMALL))
    assert torch.equal(model.state_dict()["blocks.0.attn.qkv.weight"], other["blocks.0.attn.qkv.weight"])

    # A SiT checkpoint: conv patch embedding (D, 4, 2, 2), no projector, REPA's projectors.* present.
    sit = {k: v for k, v in sd.items() if not k.startswith("projector.")}
    sit["x_embedder.proj.weight"] = sd["x_embedder.proj.weight"].reshape(64, 4, 2, 2)
    sit["projectors.0.0.weight"] = torch.zeros(8, 64)
    converted, cfg = convert_sit_checkpoint(sit, "sit")
    assert converted["x_embedder.proj.weight"].shape == (64, 16) and "projectors.0.0.weight" not in converted
    assert cfg.depth == 3 and cfg.hidden_size == 64 and cfg.num_classes == 1000 and cfg.learn_sigma
    torch.save({"model": sit}, tmp_path / "sit.pt")
    model = load_converted(tmp_path / "sit.pt", "sit", num_heads=4)
    x, t, labels = torch.randn(1, 256, 16), torch.rand(1), torch.tensor([7])
    with torch.no_grad():
        assert torch.allclose(model(x, grid_ids(1, 16, 16), t, labels), reference_forward(sd, x, t, labels),
                              atol=1e-5)
    assert model.projector is not None and model.projector.linear1.weight.abs().sum() > 0  # fresh, not zeros


def test_the_cli_names_a_missing_checkpoint_before_loading_the_vae(tmp_path, capsys):
    """`selfflow sample --official-ckpt` with neither file present named only the VAE (the checkpoint came after
    it loaded; with a dummy VAE folder, a raw diffusers message instead)."""
    from selfflow.core.cli import main

    assert main(["sample", "--official-ckpt", str(tmp_path / "selfflow_imagenet256.pt"), "--vae",
                 str(tmp_path / "sd-vae"), "--out-dir", str(tmp_path / "out"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "selfflow_imagenet256.pt does not exist" in err and "github.com/black-forest-labs/Self-Flow" in err
    assert "AutoencoderKL" not in err
