import torch
from torch import nn

from selfflow.core.ema import ema_update, make_ema


def test_ema_update_matches_formula_and_copies_buffers():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    ema = make_ema(model)
    assert not any(p.requires_grad for p in ema.parameters())
    before = [p.clone() for p in ema.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
        model[1].running_mean.fill_(3.0)
    ema_update(ema, model, 0.9)
    for e, b, p in zip(ema.parameters(), before, model.parameters()):
        assert torch.allclose(e, 0.9 * b + 0.1 * p, atol=1e-7)
    assert torch.equal(ema[1].running_mean, model[1].running_mean)
    ema_update(ema, model, 0.0)
    assert all(torch.equal(e, p) for e, p in zip(ema.parameters(), model.parameters()))


def test_ema_warmup_schedule():
    from selfflow.core.config import EMAConfig

    assert EMAConfig(decay=0.999).decay_at(5) == 0.999
    warm = EMAConfig(decay=0.999, warmup=True)
    assert warm.decay_at(0) == 0.1 and warm.decay_at(90) == 0.91 and warm.decay_at(10**6) == 0.999


def test_ema_of_a_compiled_model_is_compiled_too():
    """deepcopy drops nn.Module.compile(): the teacher of a model compiled before its EMA was made ran eagerly."""
    from selfflow.core.ema import is_compiled

    model = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 4))
    model[0].compile()
    ema = make_ema(model)
    assert [is_compiled(m) for m in ema.modules()] == [False, True, False, False]
    with torch.no_grad():
        for p in ema.parameters():
            p.zero_()
    assert torch.equal(ema(torch.randn(2, 4)), torch.zeros(2, 4))  # its own (zeroed) weights, not the model's
