import math

import pytest
import torch

from selfflow.core.backbones import count_parameters
from selfflow.core.mmdit import PRESETS, MMDiT, MMDiTConfig
from selfflow.core.modulation import TokenTimesteps
from selfflow.core.tokens import Conditioning, grid_ids

from .conftest import assert_compiled_blocks_match_eager, randomize, tiny_config


def _inputs(b=3, ctx=False):
    ids = grid_ids(1, 4, 4, batch=b)
    x = torch.randn(b, 16, 12)
    cond = Conditioning(labels=torch.tensor([0, 3, 5])[:b])
    if ctx:
        cond = cond.model_copy(update={"context": torch.randn(b, 5, 10),
                                       "context_mask": torch.tensor([[1, 1, 1, 0, 0]] * b).bool()})
    return x, ids, cond


@pytest.mark.parametrize("ctx,class_token", [(False, False), (True, False), (False, True), (True, True)])
def test_distinct_level_modulation_equals_naive_per_token(ctx, class_token):
    """Two levels per sample + gather == the modulation Linear evaluated on every token (L levels)."""
    model = randomize(MMDiT(tiny_config(context_dim=10 if ctx else 0, class_token=class_token))).eval()
    x, ids, cond = _inputs(ctx=ctx)
    t, s = torch.rand(3), torch.rand(3)
    mask = torch.rand(3, 16) < 0.3
    dense = torch.where(mask, s[:, None], t[:, None])
    fast = model(x, ids, TokenTimesteps.from_levels(torch.stack([t, s], 1), mask.long()), cond)
    naive = model(x, ids, TokenTimesteps.from_levels(dense, torch.arange(16).expand(3, 16)), cond)
    searched = model(x, ids, dense, cond)
    assert torch.allclose(fast, naive, atol=1e-6, rtol=0)
    assert torch.allclose(fast, searched, atol=1e-6, rtol=0)


def test_scalar_and_constant_per_token_timesteps_agree():
    model = randomize(MMDiT(tiny_config())).eval()
    x, ids, cond = _inputs()
    t = torch.rand(3)
    assert torch.allclose(model(x, ids, t, cond), model(x, ids, t[:, None].expand(3, 16), cond), atol=1e-6)


def test_capture_and_stop_after():
    model = randomize(MMDiT(tiny_config())).eval()
    x, ids, cond = _inputs()
    t = torch.rand(3)
    out, feats = model(x, ids, t, cond, capture=(1, 3))
    assert out.shape == x.shape and set(feats) == {1, 3} and feats[3].shape == (3, 16, 64)
    none, early = model(x, ids, t, cond, capture=(3,), stop_after=3)
    assert none is None and torch.allclose(early[3], feats[3])
    # the early exit really skips the remaining block: its weights do not matter
    with torch.no_grad():
        model.single_blocks[1].linear2.weight.add_(1.0)
    _, again = model(x, ids, t, cond, capture=(3,), stop_after=3)
    assert torch.allclose(again[3], feats[3])
    _, proj = model(x, ids, t, cond, capture=(1,), stop_after=1, project=True)
    assert torch.allclose(proj[1], model.projector(feats[1]), atol=1e-6)
    with pytest.raises(ValueError, match="out of range"):
        model(x, ids, t, cond, capture=(5,))


def test_context_mask_hides_padding():
    model = randomize(MMDiT(tiny_config(context_dim=10))).eval()
    x, ids, cond = _inputs(ctx=True)
    t = torch.rand(3)
    out = model(x, ids, t, cond)
    changed = cond.context.clone()
    changed[:, 3:] += 5.0  # only padded positions change
    assert torch.allclose(out, model(x, ids, t, cond.model_copy(update={"context": changed})), atol=1e-5)


@pytest.mark.parametrize("ctx", [False, True])
def test_class_token_reaches_the_data_through_attention(ctx):
    """With the label's modulation path cut, the label still changes the output through its context token;
    text padding stays hidden (the mask is extended for the class token)."""
    model = randomize(MMDiT(tiny_config(context_dim=10 if ctx else 0, class_token=True))).eval()
    assert model.double_blocks[0].has_context
    with torch.no_grad():
        model.label_embed.weight.zero_()
    x, ids, cond = _inputs(ctx=ctx)
    t = torch.rand(3)
    out = model(x, ids, t, cond)
    other = model(x, ids, t, cond.model_copy(update={"labels": torch.tensor([1, 2, 4])}))
    assert (out - other).abs().amax() > 1e-3
    if ctx:
        changed = cond.context.clone()
        changed[:, 3:] += 5.0
        assert torch.allclose(out, model(x, ids, t, cond.model_copy(update={"context": changed})), atol=1e-5)
    with pytest.raises(ValueError, match="class_token needs a class-conditional"):
        MMDiT(MMDiTConfig(class_token=True, modalities={"image": 12}))


def test_errors_name_what_is_missing():
    model = MMDiT(tiny_config())
    x, ids, _ = _inputs()
    with pytest.raises(ValueError, match="class-conditional"):
        model(x, ids, torch.rand(3))
    with pytest.raises(KeyError, match="audio"):
        model(x, ids, torch.rand(3), modality="audio")
    with pytest.raises(ValueError, match="divisible"):
        MMDiTConfig(hidden_size=100, num_heads=3)
    with pytest.raises(ValueError, match="unknown model preset"):
        MMDiTConfig(preset="huge")


MISUSES = [
    ("channels", r"\(B, L, C\) with C=12 for modality 'img'; got \(3, 16, 8\)"),
    ("no batch", r"\(B, L, C\) with C=12 .*got \(16, 12\)"),
    ("ids length", r"ids must be \(B, L, 3\) = \(3, 16, 3\)"),
    ("t float", r"t must be a tensor \(B,\) or \(B, L\) \(B=3, L=16\).*got float"),
    ("labels batch", r"labels must be integer class ids \(B,\) = \(3,\).*got \(2,\)"),
    ("float labels", r"labels must be integer class ids .*0…5 \(5: the null label\); got \(3,\) torch.float32"),
    ("label above null", r"labels must lie in 0…5 \(5: the null label\); got \[0, 3, 6\]"),
]


@pytest.mark.parametrize("case,match", MISUSES, ids=[case for case, _ in MISUSES])
def test_misused_inputs_raise_a_value_error_naming_the_layout(case, match):
    """Not a matmul / embedding error from deep inside the network."""
    model = MMDiT(tiny_config())
    x, ids, cond = _inputs()
    t = torch.rand(3)
    args = {"channels": (x[..., :8], ids, t, cond), "no batch": (x[0], ids[0], t[:1], cond),
            "ids length": (x, ids[:, :8], t, cond), "t float": (x, ids, 0.5, cond),
            "labels batch": (x, ids, t, Conditioning(labels=torch.tensor([0, 1]))),
            "float labels": (x, ids, t, Conditioning(labels=torch.tensor([0.0, 3.0, 5.0]))),
            "label above null": (x, ids, t, Conditioning(labels=torch.tensor([0, 3, 6])))}[case]
    with pytest.raises(ValueError, match=match):
        model(*args)


def test_ids_of_batch_one_are_shared_by_the_batch():
    model = randomize(MMDiT(tiny_config())).eval()
    x, ids, cond = _inputs()
    t = torch.rand(3)
    assert torch.equal(model(x, ids[:1], t, cond), model(x, ids, t, cond))


def test_paper_preset_parameter_count_on_meta():
    cfg = MMDiTConfig(preset="paper625m", num_classes=1000, modalities={"image": 128})
    d, h = 1152, 4608
    blocks = 7 * 2 * (4 * d * d + 3 * d * h) + 14 * (d * (3 * d + 2 * h) + (d + h) * d)
    qk_norms = (7 * 2 + 14) * 2 * (d // 16)
    mods = (6 + 6 + 3) * d * d  # shared modulation: 2 triples per double stream, 1 for single
    embed = 256 * d + d * d + 1001 * d + 4096 * d + 128 * d
    final = 2 * d * d + d * 128
    projector = d * 2 * d + 2 * d + 2 * d * d + d
    expected = blocks + qk_norms + mods + embed + final + projector
    n = count_parameters(cfg)
    assert n == expected
    assert 620e6 < n - projector < 635e6  # the paper's "~625M" backbone
    assert PRESETS["paper625m"]["hidden_size"] == 1152


@pytest.mark.parametrize("theta", [2000.0, 10000.0])
def test_rope_theta_sets_the_rotation_frequencies(theta, monkeypatch):
    """model.rope_theta reaches the rotary angles: h-axis pair i of a token at h turns by h·θ^(−2i/6)."""
    import selfflow.core.mmdit as mmdit

    original, seen = mmdit.rope_cos_sin, []

    def recording(*args):
        seen.append(original(*args))
        return seen[-1]

    monkeypatch.setattr(mmdit, "rope_cos_sin", recording)
    model = MMDiT(tiny_config(rope_theta=theta)).eval()  # axes_dim (4, 6, 6): 2 + 3 + 3 channel pairs
    x, ids, cond = _inputs()
    model(x, ids, torch.rand(3), cond)
    cos, sin = seen[0]  # (B, 1, L, 8)
    token = 2 * 4 + 3  # (h, w) = (2, 3) on the row-major 4×4 grid
    assert ids[0, token].tolist() == [0, 2, 3]
    for column, angle in ((2 + 1, 2 * theta ** (-2 / 6)), (2 + 3 + 2, 3 * theta ** (-4 / 6))):
        assert cos[0, 0, token, column].item() == pytest.approx(math.cos(angle), abs=1e-6)
        assert sin[0, 0, token, column].item() == pytest.approx(math.sin(angle), abs=1e-6)


def test_rope_theta_defaults_to_flux2s_2000():
    """FLUX.2's MMDiT uses θ = 2000 (FLUX.1: 10000); a run that does not set model.rope_theta gets FLUX.2's."""
    assert MMDiTConfig().rope_theta == 2000.0


def test_qk_norm_runs_in_fp32_and_returns_the_input_dtype():
    """Under bf16 autocast the norm takes PyTorch's fused kernel (fp32 input and scale) and hands back bf16."""
    import warnings

    from selfflow.core.mmdit_blocks import QKNorm

    norm = QKNorm(16)
    with torch.no_grad():
        norm.query_norm.weight.uniform_(0.5, 1.5)
    q = torch.randn(2, 4, 8, 16).bfloat16()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Mismatch dtype between input and weight" would be raised here
        out_q, out_k = norm(q, q)
    assert out_q.dtype == out_k.dtype == torch.bfloat16
    ref = q.float() * torch.rsqrt(q.float().square().mean(-1, keepdim=True) + 1e-6) * norm.query_norm.weight
    torch.testing.assert_close(out_q.float(), ref, rtol=1e-2, atol=1e-2)


@pytest.mark.timeout(300)
def test_compiled_blocks_equal_eager_under_two_levels():
    """Each block selects its tokens' levels inside its own (compiled, whole-graph) forward: the data stream from
    two levels, the single blocks from three (the context's level too); values and gradients as eager."""
    x, ids, cond = _inputs(ctx=True)
    model = randomize(MMDiT(tiny_config(context_dim=10, projector_mult=2.0)))
    assert_compiled_blocks_match_eager(model, (x, ids), cond, layer=3)
