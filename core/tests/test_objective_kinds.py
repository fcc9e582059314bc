import pytest
import torch

from selfflow.core import registry
from selfflow.core.objective import ObjectiveConfig
from selfflow.core.objective_kinds import BUILTIN_OBJECTIVES, ObjectiveKind, SlightlyCleaner
from selfflow.core.timesteps import TimestepDistribution


def test_builtin_kinds_are_registered_and_resolve():
    names = {k.name for k in BUILTIN_OBJECTIVES}
    assert names == {"self_flow", "flow_matching", "self_flow_no_mask", "self_flow_no_rep",
                     "self_flow_slightly_cleaner", "self_flow_l2", "repa"}
    assert names <= set(registry.available_objectives())
    for name in names:
        ObjectiveConfig(kind=name).resolve(4, 0.25, TimestepDistribution())


def test_a_misspelt_distance_is_named():
    with pytest.raises(ValueError, match="objective kind 'x': distance must be one of cosine, l2, got 'l1'"):
        ObjectiveKind("x", "", distance="l1")


def test_slightly_cleaner_is_a_fixed_gap_clipped_at_the_data_end():
    t = torch.tensor([0.05, 0.1, 0.5, 1.0])
    s = SlightlyCleaner(0.1)(t, torch.rand(4))
    assert torch.allclose(s, torch.tensor([0.0, 0.0, 0.4, 0.9]))


def test_register_objective_adds_a_kind(monkeypatch):
    monkeypatch.setattr(registry, "_OBJECTIVES", dict(registry._OBJECTIVES))
    kind = registry.register_objective(ObjectiveKind("half_gamma", "Self-Flow with γ 0.4", gamma=0.4))
    assert registry.get_objective("half_gamma") is kind
    obj = ObjectiveConfig(kind="half_gamma").resolve(4, 0.25, TimestepDistribution())
    assert obj.gamma == 0.4 and obj.kind is kind and obj.uses_teacher
    with pytest.raises(ValueError, match="objective kind 'self_flow' is built in"):
        registry.register_objective(ObjectiveKind("self_flow", "mine", gamma=123.0))
    assert registry.get_objective("self_flow").gamma == 0.8
    with pytest.raises(TypeError, match="takes an ObjectiveKind, got 'not a kind'"):
        registry.register_objective("not a kind")


@pytest.mark.parametrize("fields, says", [
    ({"teacher_level": "min_st"}, "teacher_level must be one of min_ts, t, got 'min_st'"),
    ({"alignment": "teachr"}, "alignment must be one of none, teacher, target, got 'teachr'"),
    ({"gamma": -1.0}, r"gamma \(the representation loss.s default weight\) must be a number >= 0, got -1.0"),
    ({"second_level": lambda t, s: s + 5.0}, r"must keep s in \[0, 1\] .* values in \[5, 6\]"),
    ({"second_level": lambda t, s: s.sum()}, r"must return s as t and s come, a float tensor \(11, 11\); got \(\)"),
    ({"second_level": lambda t, s: t / (t - t)}, r"must keep s in \[0, 1\]"),  # NaN
])
def test_an_objective_kind_refuses_what_would_train_another_method_silently(fields, says):
    """A misspelt teacher level used to put the teacher at t; a rule taking s above 1 trained without a word."""
    with pytest.raises(ValueError, match=says):
        ObjectiveKind("mine", "a plug-in's kind", **fields)


def test_get_objective_names_the_group_for_an_unknown_kind():
    with pytest.raises(KeyError, match=r"selfflow\.objectives"):
        registry.get_objective("nope")
