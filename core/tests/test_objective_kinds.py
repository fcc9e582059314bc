import pytest
import torch

from selfflow.core import registry
from selfflow.core.objective import ObjectiveConfig
from selfflow.core.objective_kinds import BUILTIN_OBJECTIVES, ObjectiveKind, SlightlyCleaner
from selfflow.core.timesteps import TimestepDistribution


def test_builtin_kinds_are_registered_and_resolve():
    names = {k.name for k in BUILTIN_OBJECTIVES}
    assert names == {"self_flow", "flow_matching", "self_flow_no_mask", "self_flow_no_rep",
                     "self_flow_slightly_cleaner", "repa"}
    assert names <= set(registry.available_objectives())
    for name in names:
        ObjectiveConfig(kind=name).resolve(4, 0.25, TimestepDistribution())


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


def test_get_objective_names_the_group_for_an_unknown_kind():
    with pytest.raises(KeyError, match=r"selfflow\.objectives"):
        registry.get_objective("nope")
