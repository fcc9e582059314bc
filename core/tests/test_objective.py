import warnings

import pytest
import torch

from selfflow.core.ema import make_ema
from selfflow.core.mmdit import MMDiT
from selfflow.core.modulation import TokenTimesteps
from selfflow.core.objective import ObjectiveConfig, drop_labels
from selfflow.core.timesteps import TimestepDistribution
from selfflow.core.tokens import Conditioning, Tokens, grid_ids

from .conftest import randomize, tiny_config


class Spy(MMDiT):
    """Records what each forward receives."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.calls = []

    def forward(self, x, ids, t, cond=None, **kw):
        self.calls.append({"x": x, "t": t, "grad": torch.is_grad_enabled(), **kw})
        return super().forward(x, ids, t, cond, **kw)


def _batch(b=4):
    return Tokens(torch.randn(b, 16, 12), grid_ids(1, 4, 4, batch=b)), Conditioning(labels=torch.arange(b) % 5)


def _resolve(kind, **kw):
    return ObjectiveConfig(kind=kind, **kw).resolve(4, 0.25, TimestepDistribution())


def test_teacher_sees_tau_min_at_its_layer_without_grad():
    student = randomize(Spy(tiny_config()))
    teacher = make_ema(student)
    teacher.calls = []
    tokens, cond = _batch()
    obj = _resolve("self_flow", student_layer=1, teacher_layer=3, label_dropout=0.0)
    gen = torch.Generator().manual_seed(0)
    losses = obj.loss(student, teacher, tokens, cond, null_label=5, modality=None, generator=gen)
    (s_call,), (t_call,) = student.calls, teacher.calls
    assert s_call["capture"] == (1,) and s_call["project"] and s_call["grad"]
    assert t_call["capture"] == (3,) and t_call["stop_after"] == 3 and not t_call["grad"]
    # replay the generator to recover the noise and levels the loss drew
    gen = torch.Generator().manual_seed(0)
    torch.rand(4, generator=gen)  # label-dropout draw
    noise = torch.randn(tokens.x.shape, generator=gen)
    t, s = torch.rand(4, generator=gen), torch.rand(4, generator=gen)
    tau_min = torch.minimum(t, s)
    assert isinstance(s_call["t"], TokenTimesteps)
    assert torch.equal(t_call["t"], tau_min)
    expected = (1 - tau_min[:, None, None]) * tokens.x + tau_min[:, None, None] * noise
    assert torch.allclose(t_call["x"], expected, atol=1e-6)
    dense = s_call["t"].dense()
    assert ((dense == t[:, None]) | (dense == s[:, None])).all()
    assert (dense == s[:, None]).sum(1).tolist() == [4, 4, 4, 4]  # R_M = 0.25 of 16 tokens
    assert losses["loss"].requires_grad and losses["loss_rep"].item() < 0
    assert torch.allclose(losses["loss"], losses["loss_fm"] + 0.8 * losses["loss_rep"])


def test_flow_matching_has_no_teacher_and_no_mask():
    student = Spy(tiny_config(projector_mult=0))
    tokens, cond = _batch()
    obj = _resolve("flow_matching")
    assert obj.mask_ratio == 0 and obj.gamma == 0 and not obj.uses_teacher
    losses = obj.loss(student, None, tokens, cond, null_label=5, modality=None, generator=None)
    (call,) = student.calls
    assert call["t"].shape == (4,) and "capture" not in call
    assert losses["loss_rep"].item() == 0


def test_ablation_presets():
    assert _resolve("self_flow_no_mask").mask_ratio == 0 and _resolve("self_flow_no_mask").gamma == 0.8
    assert _resolve("self_flow_no_rep").gamma == 0 and _resolve("self_flow_no_rep").mask_ratio == 0.25
    assert _resolve("self_flow_no_rep", gamma=0.5).gamma == 0  # a kind without the term ignores γ
    cleaner = _resolve("self_flow_slightly_cleaner")
    assert cleaner.mask_ratio == 0.25 and cleaner.gamma == 0.8 and cleaner.teacher_level == "min_ts"
    repa = _resolve("repa")
    assert repa.gamma == 0.5 and repa.mask_ratio == 0 and repa.uses_projector and not repa.uses_teacher
    assert _resolve("self_flow_no_mask").teacher_level == "t"
    assert _resolve("self_flow_no_mask", teacher_level="min_ts").teacher_level == "min_ts"
    assert _resolve("self_flow").student_layer == 1 and _resolve("self_flow").teacher_layer == 3
    with pytest.raises(ValueError, match="teacher_layer"):
        _resolve("self_flow", teacher_layer=9)


def test_a_student_at_or_below_the_teacher_warns_naming_both_layers():
    with pytest.warns(UserWarning, match=r"student_layer = 3 is at or deeper than objective.teacher_layer = 2 "
                                         r"\(of 4 blocks\)") as caught:
        ObjectiveConfig(student_layer=3, teacher_layer=2).resolve(4, 0.25, TimestepDistribution())
    assert len(caught) == 1
    with pytest.warns(UserWarning, match="student_layer = 2 is at or deeper than objective.teacher_layer = 2"):
        _resolve("self_flow", student_layer=2, teacher_layer=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _resolve("self_flow", student_layer=1, teacher_layer=2)
        _resolve("flow_matching", student_layer=3, teacher_layer=2)  # no teacher: nothing to align
        _resolve("repa", student_layer=3, teacher_layer=2)  # aligns to an external encoder


def test_label_dropout_uses_null_label():
    cond = Conditioning(labels=torch.zeros(4000, dtype=torch.long))
    dropped = drop_labels(cond, 0.1, null_label=5, generator=torch.Generator().manual_seed(0)).labels
    assert set(dropped.unique().tolist()) == {0, 5}
    assert (dropped == 5).float().mean().item() == pytest.approx(0.1, abs=0.015)
    assert torch.equal(drop_labels(cond, 0.0, 5, None).labels, cond.labels)


@pytest.mark.parametrize("kind", ["self_flow", "flow_matching"])
def test_loss_falls_on_a_fixed_batch(kind):
    model = MMDiT(tiny_config(projector_mult=2 if kind == "self_flow" else 0))
    teacher = make_ema(model)
    tokens, cond = _batch(8)
    obj = _resolve(kind, label_dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def loss_fm() -> float:
        """The flow-matching loss over the whole fixed set of draws (before, one draw against another)."""
        with torch.no_grad():
            return sum(obj.loss(model, teacher, tokens, cond, null_label=5, modality=None,
                                generator=torch.Generator().manual_seed(s))["loss_fm"].item() for s in range(4)) / 4

    first = loss_fm()
    for step in range(60):
        gen = torch.Generator().manual_seed(step % 4)  # a small fixed set of noise draws
        losses = obj.loss(model, teacher, tokens, cond, null_label=5, modality=None, generator=gen)
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
    last = loss_fm()
    assert last < 0.3 * first, (first, last)  # 0.04 (Self-Flow) and 0.06 (flow matching) here


def test_an_unknown_kind_is_an_error_listing_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown objective.kind 'nope'; known: .*flow_matching.*self_flow_no_mask"):
        ObjectiveConfig(kind="nope")


def _replay(seed, b=4, length=16):
    """The step's draws, recomputed from the generator: label dropout, noise, t, s, then the mask."""
    gen = torch.Generator().manual_seed(seed)
    torch.rand(b, generator=gen)
    noise = torch.randn(b, length, 12, generator=gen)
    return noise, torch.rand(b, generator=gen), torch.rand(b, generator=gen)


@pytest.mark.parametrize("teacher_level", [None, "min_ts"])
def test_no_mask_teacher_level(teacher_level):
    """SRA's no-mask variant (the default): the teacher sees the student's own x_t at t; ``min_ts`` keeps the
    earlier choice, min(t, s) of an otherwise unused s. Losses recomputed by hand from the draws."""
    student = randomize(Spy(tiny_config()))
    teacher = make_ema(student)
    teacher.calls = []
    tokens, cond = _batch()
    obj = _resolve("self_flow_no_mask", student_layer=1, teacher_layer=3, label_dropout=0.0,
                   teacher_level=teacher_level)
    losses = obj.loss(student, teacher, tokens, cond, null_label=5, modality=None,
                      generator=torch.Generator().manual_seed(0))
    noise, t, s = _replay(0)
    level = t if teacher_level is None else torch.minimum(t, s)
    assert not torch.equal(level, t) or teacher_level is None
    x_student = (1 - t[:, None, None]) * tokens.x + t[:, None, None] * noise
    x_teacher = (1 - level[:, None, None]) * tokens.x + level[:, None, None] * noise
    assert torch.equal(student.calls[0]["t"], t) and torch.equal(teacher.calls[0]["t"], level)
    with torch.no_grad():
        pred, s_feats = student(x_student, tokens.ids, t, cond, capture=(1,), project=True)
        _, t_feats = teacher(x_teacher, tokens.ids, level, cond, capture=(3,))
    fm = ((pred - (noise - tokens.x)) ** 2).mean()
    rep = -torch.nn.functional.cosine_similarity(s_feats[1], t_feats[3], dim=-1).mean()
    assert torch.allclose(losses["loss_fm"], fm, rtol=1e-5) and torch.allclose(losses["loss_rep"], rep, rtol=1e-5)


def test_slightly_cleaner_second_level():
    """Masked tokens at s = max(t − 0.1, 0), the rest at t; the teacher at min(t, s) = s."""
    student = randomize(Spy(tiny_config()))
    teacher = make_ema(student)
    teacher.calls = []
    tokens, cond = _batch()
    obj = _resolve("self_flow_slightly_cleaner", label_dropout=0.0)
    obj.loss(student, teacher, tokens, cond, null_label=5, modality=None, generator=torch.Generator().manual_seed(1))
    _, t, _ = _replay(1)
    s = (t - 0.1).clamp(min=0)
    dense = student.calls[0]["t"].dense()
    masked = dense != t[:, None]
    assert masked.sum(1).tolist() == [4, 4, 4, 4]
    assert torch.equal(dense[masked], s[:, None].expand(-1, 16)[masked])
    assert torch.equal(teacher.calls[0]["t"], s)


def test_l2_kind_changes_only_the_representation_distance(monkeypatch):
    """``self_flow_l2`` (the paper's "L2 instead of cosine" ablation) draws what ``self_flow`` draws and scores
    the same student and teacher features with the channel-mean squared difference."""
    from selfflow.core import loss_terms, objective

    seen = []

    def recording(feats, aligned_to, weight=None, distance="cosine"):
        seen.append((feats.detach(), aligned_to, weight, distance))
        return loss_terms.alignment_loss(feats, aligned_to, weight, distance)

    monkeypatch.setattr(objective, "alignment_loss", recording)
    student = randomize(Spy(tiny_config()))
    teacher = make_ema(student)
    tokens, cond = _batch()
    out = {kind: _resolve(kind, student_layer=1, teacher_layer=3).loss(
        student, teacher, tokens, cond, null_label=5, modality=None, generator=torch.Generator().manual_seed(3))
        for kind in ("self_flow", "self_flow_l2")}
    (f_cos, t_cos, _, d_cos), (f_l2, t_l2, w_l2, d_l2) = seen
    assert (d_cos, d_l2) == ("cosine", "l2")
    assert torch.equal(f_cos, f_l2) and torch.equal(t_cos, t_l2)
    assert torch.equal(out["self_flow"]["loss_fm"], out["self_flow_l2"]["loss_fm"])
    err = ((f_l2 - t_l2) ** 2).mean(-1)  # (B, L)
    expected = err.mean() if w_l2 is None else (w_l2 * err).sum()
    assert torch.allclose(out["self_flow_l2"]["loss_rep"], expected, rtol=1e-5)
    assert torch.allclose(out["self_flow_l2"]["loss"], out["self_flow_l2"]["loss_fm"] + 0.8 * expected, rtol=1e-5)


def test_repa_aligns_with_the_external_target_and_runs_no_teacher():
    student = randomize(Spy(tiny_config()))
    tokens, cond = _batch()
    obj = _resolve("repa", label_dropout=0.0)
    with pytest.raises(ValueError, match=r"tokens\.target"):
        obj.loss(student, None, tokens, cond, null_label=5, modality=None, generator=None)
    width = student(tokens.x, tokens.ids, torch.rand(4), cond, capture=(1,), project=True)[1][1].shape[-1]
    target = torch.randn(4, 16, width)
    student.calls = []
    losses = obj.loss(student, None, Tokens(tokens.x, tokens.ids, target=target), cond, null_label=5,
                      modality=None, generator=torch.Generator().manual_seed(0))
    assert len(student.calls) == 1 and losses["loss_rep"].item() != 0
    assert torch.allclose(losses["loss"], losses["loss_fm"] + 0.5 * losses["loss_rep"])
