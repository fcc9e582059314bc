import pytest
import torch

from selfflow.core.ema import make_ema
from selfflow.core.mmdit import MMDiT
from selfflow.core.modulation import TokenTimesteps
from selfflow.core.objective import ObjectiveConfig, self_flow_loss
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
    losses = self_flow_loss(student, teacher, tokens, cond, obj, null_label=5, generator=gen)
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
    losses = self_flow_loss(student, None, tokens, cond, obj, null_label=5)
    (call,) = student.calls
    assert call["t"].shape == (4,) and "capture" not in call
    assert losses["loss_rep"].item() == 0


def test_ablation_presets():
    assert _resolve("self_flow_no_mask").mask_ratio == 0 and _resolve("self_flow_no_mask").gamma == 0.8
    assert _resolve("self_flow_no_rep").gamma == 0 and _resolve("self_flow_no_rep").mask_ratio == 0.25
    assert _resolve("self_flow").student_layer == 1 and _resolve("self_flow").teacher_layer == 3
    with pytest.raises(ValueError, match="teacher_layer"):
        _resolve("self_flow", teacher_layer=9)


def test_label_dropout_uses_null_label():
    from selfflow.core.objective import drop_labels

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
    first, last = None, None
    for step in range(60):
        gen = torch.Generator().manual_seed(step % 4)  # a small fixed set of noise draws
        losses = self_flow_loss(model, teacher, tokens, cond, obj, null_label=5, generator=gen)
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
        first = first if first is not None else losses["loss_fm"].item()
        last = losses["loss_fm"].item()
    assert last < 0.6 * first


def test_step_noise_does_not_depend_on_the_number_of_ranks():
    from selfflow.core.objective import StepNoise

    obj = _resolve("self_flow")
    whole = StepNoise.draw((6, 16, 12), obj, torch.Generator().manual_seed(3), "cpu")
    parts = [StepNoise.draw((3, 16, 12), obj, torch.Generator().manual_seed(3), "cpu", shard=(r, 2))
             for r in range(2)]
    assert torch.equal(torch.cat([p.noise for p in parts]), whole.noise)
    assert torch.equal(torch.cat([p.dual.tau for p in parts]), whole.dual.tau)
    assert torch.equal(torch.cat([p.drop for p in parts]), whole.drop)
