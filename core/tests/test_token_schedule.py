"""The token-group hook: schedule modes, per-group loss means, teacher levels, rank invariance."""

import pytest
import torch

from selfflow.core.dual_timestep import exact_count_mask
from selfflow.core.ema import make_ema
from selfflow.core.mmdit import MMDiT
from selfflow.core.modulation import TokenTimesteps
from selfflow.core.noise_plan import StepNoise
from selfflow.core.objective import ObjectiveConfig
from selfflow.core.timesteps import TimestepDistribution
from selfflow.core.token_schedule import (
    ScheduleMode,
    TokenGroup,
    TokenSchedule,
    draw_modes,
    schedule_levels,
)
from selfflow.core.tokens import Conditioning, Tokens, grid_ids

from .conftest import randomize, tiny_config

# 16 tokens: 2 context (clean), 10 video (Self-Flow), 4 actions.
GROUPS = torch.tensor([0] * 2 + [1] * 10 + [2] * 4)
CTX, VID, ACT = slice(0, 2), slice(2, 12), slice(12, 16)


def _schedule(probs=(0.45, 0.2, 0.2, 0.15), action_weight=3.0) -> TokenSchedule:
    clean = {"context": "clean"}
    return TokenSchedule(
        groups=(TokenGroup("context", 0.0), TokenGroup("video", 1.0, self_flow=True),
                TokenGroup("action", action_weight)),
        modes=(ScheduleMode("independent", probs[0], clean),
               ScheduleMode("shared", probs[1], {**clean, "action": "shared"}),
               ScheduleMode("policy", probs[2], {**clean, "video": "noise"}),
               ScheduleMode("video", probs[3], {**clean, "action": "noise"})))


class Spy(MMDiT):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.calls = []

    def forward(self, x, ids, t, cond=None, **kw):
        out = super().forward(x, ids, t, cond, **kw)
        self.calls.append({"x": x, "t": t, "out": out[0] if isinstance(out, tuple) else out, **kw})
        return out


def _batch(b=4):
    return (Tokens(torch.randn(b, 16, 12), grid_ids(1, 4, 4, batch=b)),
            Conditioning(labels=torch.arange(b) % 5))


def _obj(kind="self_flow", **kw):
    return ObjectiveConfig(kind=kind, label_dropout=0.0, **kw).resolve(4, 0.2, TimestepDistribution())


def test_mode_frequencies_follow_the_probabilities():
    modes = draw_modes(_schedule(), 40000, torch.Generator().manual_seed(0), "cpu")
    freq = torch.bincount(modes, minlength=4).float() / len(modes)
    assert torch.allclose(freq, torch.tensor([0.45, 0.2, 0.2, 0.15]), atol=0.01), freq
    only = draw_modes(_schedule((0, 0, 1, 0)), 1000, torch.Generator().manual_seed(0), "cpu")
    assert (only == 2).all()


def test_bad_schedules_are_clear_errors():
    with pytest.raises(ValueError, match="unique names"):
        TokenSchedule((TokenGroup("a"), TokenGroup("a")), (ScheduleMode("m", 1.0),))
    with pytest.raises(ValueError, match="rule 'b'"):
        TokenSchedule((TokenGroup("a"),), (ScheduleMode("m", 1.0, {"b": "noise"}),))
    with pytest.raises(ValueError, match="probabilities"):
        TokenSchedule((TokenGroup("a"),), (ScheduleMode("m", 0.0),))


def test_mask_only_picks_eligible_tokens_with_an_exact_count():
    eligible = GROUPS == 1
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    mask = exact_count_mask(64, 16, 0.3, g1, eligible=eligible)
    assert (mask.sum(1) == 3).all() and not mask[:, ~eligible].any()  # round(0.3·10)
    exact_count_mask(64, 16, 0.3, g2)
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))  # same number of draws


def test_each_mode_sets_the_levels_it_names():
    sched = _schedule()
    obj = _obj()
    gen = torch.Generator().manual_seed(0)
    rnd = StepNoise.draw((400, 16, 12), obj, gen, "cpu", eligible=sched.eligible(GROUPS))
    lv = schedule_levels(sched, GROUPS, rnd.dual, obj.timesteps, gen)
    tau, teach = lv.student.dense(), lv.teacher.dense()
    t, s = rnd.dual.t[:, None], rnd.dual.s[:, None]
    assert (tau[:, CTX] == 0).all() and (teach[:, CTX] == 0).all()  # context: clean in every mode
    assert (lv.fm_weight[:, CTX] == 0).all()
    vid = rnd.dual.mask[:, VID]
    assert (rnd.dual.mask[:, :2] == 0).all() and (rnd.dual.mask[:, 12:] == 0).all()
    for m, name in enumerate(["independent", "shared", "policy", "video"]):
        rows = lv.modes == m
        assert rows.sum() > 30, name
        tv, ta = tau[rows][:, VID], tau[rows][:, ACT]
        if name == "policy":  # video at pure noise (t = 1), no video loss, no rep loss
            assert (tv == 1).all() and (lv.fm_weight[rows][:, VID] == 0).all()
            assert (lv.rep_weight[rows] == 0).all() and (teach[rows][:, VID] == 1).all()
        else:  # video: t, masked tokens s; the teacher at τ_min
            expect = torch.where(vid[rows], s[rows], t[rows])
            assert torch.equal(tv, expect)
            assert torch.equal(teach[rows][:, VID], torch.minimum(t, s)[rows].expand(-1, 10))
            assert (lv.rep_weight[rows][:, VID] > 0).all()
        if name == "video":  # actions marginalised: pure noise, no action loss
            assert (ta == 1).all() and (lv.fm_weight[rows][:, ACT] == 0).all()
        else:
            assert (lv.fm_weight[rows][:, ACT] > 0).all() and (ta < 1).all()
        if name == "shared":
            assert torch.equal(ta, t[rows].expand(-1, 4))
        if name in ("independent", "policy"):  # own action level, not t
            assert not torch.equal(ta[:, 0], t[rows][:, 0])
            assert (ta == ta[:, :1]).all()
        assert torch.equal(teach[rows][:, ACT], ta)  # the teacher sees actions at the student's level
    assert lv.student.values.shape == (400, 6) and lv.student.index.shape == (400, 16)


def test_policy_only_feeds_pure_noise_on_video_and_data_on_context():
    student = randomize(Spy(tiny_config(projector_mult=2)))
    teacher = make_ema(student)
    teacher.calls = []
    tokens, cond = _batch()
    sched = _schedule((0, 0, 1, 0))
    losses = _obj().loss(student, teacher, tokens, cond, null_label=5, modality=None,
                         generator=torch.Generator().manual_seed(0), schedule=sched, groups=GROUPS)
    (call,) = student.calls
    gen = torch.Generator().manual_seed(0)
    torch.rand(4, generator=gen)
    noise = torch.randn(tokens.x.shape, generator=gen)
    assert isinstance(call["t"], TokenTimesteps)
    assert torch.equal(call["x"][:, VID], noise[:, VID])  # t = 1: pure noise
    assert torch.equal(call["x"][:, CTX], tokens.x[:, CTX])  # t = 0: the data
    assert losses["loss_fm_video"].item() == 0 and losses["loss_rep"].item() == 0
    assert "loss_fm_context" not in losses  # a group that never carries loss logs nothing
    assert losses["loss_fm_action"].item() > 0
    assert torch.allclose(losses["loss"], 3.0 * losses["loss_fm_action"])


def _hand_fm(pred, target, weight_of_group, groups_live):
    err = ((pred - target) ** 2).mean(-1)  # (B, L)
    out = {}
    for name, sl in (("video", VID), ("action", ACT)):
        live = groups_live[name]  # (B,) samples whose group carries loss
        e = err[:, sl][live]
        out[name] = e.mean() if e.numel() else torch.zeros(())
    out["total"] = sum(weight_of_group[k] * out[k] for k in ("video", "action"))
    return out


@pytest.mark.parametrize("action_channels", [None, 5])
def test_per_group_means_equal_a_hand_computation(action_channels):
    student = randomize(Spy(tiny_config(projector_mult=0)))
    tokens, cond = _batch(8)
    sched = _schedule()
    if action_channels:
        sched = TokenSchedule((*sched.groups[:2], TokenGroup("action", 3.0, channels=action_channels)),
                              sched.modes)
    obj = _obj("flow_matching")
    gen = torch.Generator().manual_seed(5)
    losses = obj.loss(student, None, tokens, cond, null_label=5, modality=None, generator=gen, schedule=sched,
                      groups=GROUPS)
    (call,) = student.calls
    gen = torch.Generator().manual_seed(5)
    rnd = StepNoise.draw((8, 16, 12), obj, gen, "cpu", eligible=sched.eligible(GROUPS))
    lv = schedule_levels(sched, GROUPS, rnd.dual, obj.timesteps, gen)
    modes = lv.modes
    assert len(set(modes.tolist())) > 1
    live = {"video": modes != 2, "action": modes != 3}
    pred, target = call["out"].detach(), rnd.noise - tokens.x
    if action_channels:  # the action tokens' loss covers their first channels only
        pred, target = pred.clone(), target.clone()
        pred[:, ACT, action_channels:] = target[:, ACT, action_channels:] = 0
        pred[:, ACT] *= (12 / action_channels) ** 0.5
        target[:, ACT] *= (12 / action_channels) ** 0.5
    hand = _hand_fm(pred, target, {"video": 1.0, "action": 3.0}, live)
    assert torch.allclose(losses["loss_fm_video"], hand["video"], rtol=1e-5)
    assert torch.allclose(losses["loss_fm_action"], hand["action"], rtol=1e-5)
    assert torch.allclose(losses["loss_fm"], hand["total"], rtol=1e-5)
    assert torch.allclose(losses["loss"], hand["total"], rtol=1e-5)


def test_slices_average_to_the_global_loss():
    """Two ranks' slices (per-group means over the *global* counts) average to the one-rank loss."""
    student = randomize(MMDiT(tiny_config(projector_mult=2)))
    teacher = make_ema(student)
    tokens, cond = _batch(8)
    sched, obj = _schedule(), _obj()
    kw = dict(null_label=5, modality=None, schedule=sched, groups=GROUPS)
    whole = obj.loss(student, teacher, tokens, cond, generator=torch.Generator().manual_seed(2), **kw)
    parts = [obj.loss(student, teacher, Tokens(tokens.x[r * 4:(r + 1) * 4], tokens.ids[r * 4:(r + 1) * 4]),
                      Conditioning(labels=cond.labels[r * 4:(r + 1) * 4]),
                      generator=torch.Generator().manual_seed(2), shard=(r, 2), **kw) for r in range(2)]
    for k in ("loss", "loss_fm", "loss_rep", "loss_fm_video", "loss_fm_action"):
        assert torch.allclose((parts[0][k] + parts[1][k]) / 2, whole[k], rtol=1e-4, atol=1e-6), k


def test_without_a_schedule_the_numbers_are_unchanged():
    student = randomize(MMDiT(tiny_config(projector_mult=2)))
    teacher = make_ema(student)
    tokens, cond = _batch()
    obj = _obj()
    a = obj.loss(student, teacher, tokens, cond, null_label=5, modality=None,
                 generator=torch.Generator().manual_seed(4))
    b = obj.loss(student, teacher, tokens, cond, null_label=5, modality=None,
                 generator=torch.Generator().manual_seed(4), schedule=None, groups=GROUPS)
    assert set(a) == {"loss", "loss_fm", "loss_rep"} and all(torch.equal(a[k], b[k]) for k in a)


def test_scheduled_loss_trains_the_small_group():
    """With the action group weighted, its loss falls on a fixed batch although it is 4 of 16 tokens."""
    model = MMDiT(tiny_config(projector_mult=0))
    tokens, cond = _batch(8)
    sched, obj = _schedule(), _obj("flow_matching")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    hist = []
    for step in range(60):
        losses = obj.loss(model, None, tokens, cond, null_label=5, modality=None, schedule=sched, groups=GROUPS,
                          generator=torch.Generator().manual_seed(step % 4))
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
        hist.append(losses["loss_fm_action"].item())
    assert sum(hist[-4:]) < 0.6 * sum(hist[:4])


def test_padding_channels_are_not_noised():
    """A group's channels beyond its content (padding, flags) reach student and teacher as data."""
    student = randomize(Spy(tiny_config(projector_mult=2)))
    teacher = make_ema(student)
    teacher.calls = []
    tokens, cond = _batch()
    base = _schedule()
    sched = TokenSchedule((*base.groups[:2], TokenGroup("action", 3.0, channels=5)), base.modes)
    _obj().loss(student, teacher, tokens, cond, null_label=5, modality=None,
                generator=torch.Generator().manual_seed(0), schedule=sched, groups=GROUPS)
    for call in (student.calls[0], teacher.calls[0]):
        assert torch.equal(call["x"][:, ACT, 5:], tokens.x[:, ACT, 5:])
        assert not torch.equal(call["x"][:, ACT, :5], tokens.x[:, ACT, :5])
        assert not torch.equal(call["x"][:, VID], tokens.x[:, VID])


def test_teacher_level_t_puts_representation_tokens_at_t():
    sched, obj = _schedule(), _obj(teacher_level="t")
    gen = torch.Generator().manual_seed(0)
    rnd = StepNoise.draw((64, 16, 12), obj, gen, "cpu", eligible=sched.eligible(GROUPS))
    lv = schedule_levels(sched, GROUPS, rnd.dual, obj.timesteps, gen, teacher_level=obj.teacher_level)
    teach, rep = lv.teacher.dense(), lv.rep_weight > 0
    assert rep.any() and (rnd.dual.s != rnd.dual.t).all()
    assert torch.equal(teach[rep], rnd.dual.t[:, None].expand(-1, 16)[rep])
    assert torch.equal(teach[~rep], lv.student.dense()[~rep])
