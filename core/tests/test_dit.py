import pytest
import torch

from selfflow.core.backbones import build_backbone, count_parameters
from selfflow.core.config import load_config
from selfflow.core.dit import DiT, DiTConfig, dit_forward_flops, sincos_pos_embed_2d
from selfflow.core.modulation import TokenTimesteps
from selfflow.core.tokens import Conditioning, grid_ids

from .conftest import assert_compiled_blocks_match_eager, randomize


def tiny(**kw) -> DiT:
    cfg = DiTConfig(preset="tiny", grid_size=4, num_classes=5, modalities={"image": 16}, **kw)
    return randomize(DiT(cfg)).eval()


def _inputs(b=3):
    return torch.randn(b, 16, 16), grid_ids(1, 4, 4, batch=b), Conditioning(labels=torch.tensor([0, 3, 5])[:b])


def test_distinct_level_modulation_equals_naive_per_token():
    model = tiny()
    x, ids, cond = _inputs()
    t, s = torch.rand(3), torch.rand(3)
    mask = torch.rand(3, 16) < 0.3
    dense = torch.where(mask, s[:, None], t[:, None])
    fast = model(x, ids, TokenTimesteps.from_levels(torch.stack([t, s], 1), mask.long()), cond)
    naive = model(x, ids, TokenTimesteps.from_levels(dense, torch.arange(16).expand(3, 16)), cond)
    assert torch.allclose(fast, naive, atol=1e-6, rtol=0)
    assert torch.allclose(fast, model(x, ids, dense, cond), atol=1e-6, rtol=0)
    # (B,) equals a constant (B, L)
    assert torch.allclose(model(x, ids, t, cond), model(x, ids, t[:, None].expand(3, 16), cond), atol=1e-6)


def test_capture_stop_after_project_and_labels_tensor():
    model = tiny()
    x, ids, cond = _inputs()
    t = torch.rand(3)
    out, feats = model(x, ids, t, cond, capture=(1, 3))
    assert out.shape == x.shape and feats[3].shape == (3, 16, 64)
    none, early = model(x, ids, t, cond, capture=(3,), stop_after=3)
    assert none is None and torch.allclose(early[3], feats[3])
    with torch.no_grad():
        model.blocks[3].mlp.fc2.weight.add_(1.0)  # block 4 is skipped by the early exit
    _, again = model(x, ids, t, cond, capture=(3,), stop_after=3)
    assert torch.allclose(again[3], feats[3])
    _, proj = model(x, ids, t, cond, capture=(1,), stop_after=1, project=True)
    assert torch.allclose(proj[1], model.projector(feats[1]), atol=1e-6)
    assert torch.equal(model(x, ids, t, cond.labels), model(x, ids, t, cond))
    with pytest.raises(ValueError, match="out of range"):
        model(x, ids, t, cond, capture=(5,))
    with pytest.raises(ValueError, match="class-conditional"):
        model(x, ids, t)


def test_misused_inputs_raise_a_value_error_naming_the_layout():
    model = tiny()
    x, ids, cond = _inputs()
    t = torch.rand(3)
    with pytest.raises(ValueError, match=r"\(B, L, C\) with C=16 for modality 'image'; got \(3, 16, 12\)"):
        model(x[..., :12], ids, t, cond)
    with pytest.raises(ValueError, match=r"labels must be integer class ids \(B,\) = \(3,\)"):
        model(x, ids, t, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match=r"labels must lie in 0…5 \(5: the null label\)"):
        model(x, ids, t, torch.tensor([0, 1, 6]))
    assert torch.equal(model(x, ids[:1], t, cond), model(x, ids, t, cond))  # shared ids still broadcast


def test_time_convention_rf_vs_sit():
    """sit embeds 1 − t and negates; rf is the same network without either."""
    sit = tiny()
    rf = DiT(sit.cfg.model_copy(update={"time_input": "rf"}))
    rf.load_state_dict(sit.state_dict())
    x, ids, cond = _inputs()
    t = torch.rand(3)
    assert torch.allclose(sit(x, ids, t, cond), -rf.eval()(x, ids, 1 - t, cond), atol=1e-6)


def test_positions_follow_ids_and_the_dit_table():
    pe = sincos_pos_embed_2d(8, 3)
    # row-major token (h=1, w=2): first half encodes w, second h; each half [sin, cos] with ω = 1, 1e-2
    w, h = 2.0, 1.0
    expected = torch.tensor([torch.sin(torch.tensor(w)), torch.sin(torch.tensor(w / 100)),
                             torch.cos(torch.tensor(w)), torch.cos(torch.tensor(w / 100)),
                             torch.sin(torch.tensor(h)), torch.sin(torch.tensor(h / 100)),
                             torch.cos(torch.tensor(h)), torch.cos(torch.tensor(h / 100))])
    assert torch.allclose(pe[1 * 3 + 2], expected, atol=1e-6)
    model = tiny()
    x, ids, cond = _inputs()
    perm = torch.randperm(16)  # permuting tokens together with their ids permutes the output
    t = torch.rand(3)
    assert torch.allclose(model(x, ids, t, cond)[:, perm], model(x[:, perm], ids[:, perm], t, cond), atol=1e-5)


def test_xl_preset_matches_the_official_size_and_builds_from_a_run_config():
    cfg = DiTConfig(preset="XL/2", num_classes=1000, modalities={"image": 16})
    assert count_parameters(cfg) == 680_441_504  # training-anchors §1.4
    run = load_config(None, ["model.arch=dit", "model.preset=B/2"])
    assert isinstance(run.model, DiTConfig) and run.model.depth == 12
    model = build_backbone(run.model.model_copy(update={"modalities": {"image": 16}}))
    assert isinstance(model, DiT) and len(model.blocks()) == 12
    # adaLN once per sample: the analytic count is the SiT-XL/2 ~118 GMAC per image
    flops = dit_forward_flops(cfg, 256, token_channels=16)
    assert 225e9 < flops < 245e9
    with pytest.raises(ValueError, match="unknown DiT preset"):
        DiTConfig(preset="XXL/2")


def test_trains_a_step_with_activation_checkpointing():
    model = tiny().train()
    model.activation_checkpointing = True
    x, ids, cond = _inputs()
    model(x, ids, torch.rand(3, 16), cond).square().mean().backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None
    assert model.pos_embed.grad is None  # the position table is fixed


def test_token_layouts_the_2d_position_table_cannot_hold_are_config_errors():
    """Audio or video on the DiT trained position-blind without a word (the t column was ignored); a grid past
    grid_size was a raw IndexError in the first forward."""
    from selfflow.core.config import ConfigError
    from selfflow.core.run_setup import build_run

    for modality, options in (("audio", "{sample_rate: 8000, num_samples: 1024, patch: 64, conditioning: class}"),
                              ("video", "{conditioning: class}")):
        with pytest.raises(ConfigError, match=rf"modality '{modality}' places its tokens along a time axis"):
            build_run(load_config(None, [f"data.modality={modality}", f"data.options={options}",
                                         "model={arch: dit, preset: tiny}"]))
    with pytest.raises(ConfigError, match=r"8×8 token grid, larger than .* \(model\.grid_size=4\): set model\.grid_size=8"):
        build_run(load_config(None, ["model={arch: dit, preset: tiny, grid_size: 4}"]))
    assert build_run(load_config(None, ["model={arch: dit, preset: tiny, grid_size: 8}"])).backbone.depth > 0


@pytest.mark.timeout(300)
def test_compiled_blocks_equal_eager_under_two_levels():
    """The blocks' level modulation traces whole into a compiled block: values and gradients as eager."""
    x, ids, cond = _inputs()
    assert_compiled_blocks_match_eager(tiny(projector_mult=2.0), (x, ids), cond, layer=1)
