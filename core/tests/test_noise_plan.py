import pytest
import torch

from selfflow.core.dual_timestep import TeacherLevel
from selfflow.core.noise_plan import (
    DualTimestepPlan,
    NoiseSettings,
    StepNoise,
    TokenSchedulePlan,
    plan_for,
)
from selfflow.core.objective import ObjectiveConfig
from selfflow.core.timesteps import TimestepDistribution
from selfflow.core.token_schedule import ScheduleMode, TokenGroup, TokenSchedule


def _resolve(kind="self_flow", **kw):
    return ObjectiveConfig(kind=kind, **kw).resolve(4, 0.25, TimestepDistribution())


def test_step_noise_does_not_depend_on_the_number_of_ranks():
    obj = _resolve("self_flow")
    whole = StepNoise.draw((6, 16, 12), obj, torch.Generator().manual_seed(3), "cpu")
    parts = [StepNoise.draw((3, 16, 12), obj, torch.Generator().manual_seed(3), "cpu", shard=(r, 2))
             for r in range(2)]
    assert torch.equal(torch.cat([p.noise for p in parts]), whole.noise)
    assert torch.equal(torch.cat([p.dual.tau for p in parts]), whole.dual.tau)
    assert torch.equal(torch.cat([p.drop for p in parts]), whole.drop)


class _Settings:
    """A stand-in objective whose second level is always 0.5."""

    label_dropout = 0.0
    mask_ratio = 0.25
    timesteps = TimestepDistribution()
    teacher_level: TeacherLevel = "min_ts"

    @staticmethod
    def second_level(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return torch.full_like(s, 0.5)


def test_a_second_level_rule_replaces_s_without_moving_later_draws():
    settings: NoiseSettings = _Settings()
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    ruled = StepNoise.draw((4, 8, 3), settings, g1, "cpu")
    plain = StepNoise.draw((4, 8, 3), _resolve(), g2, "cpu")
    assert (ruled.dual.s == 0.5).all() and torch.equal(ruled.dual.t, plain.dual.t)
    assert torch.equal(ruled.noise, plain.noise) and torch.equal(ruled.dual.mask, plain.dual.mask)
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))


def test_a_second_level_rule_that_returns_no_tensor_of_s_s_shape_is_named():
    class Scalar(_Settings):
        @staticmethod
        def second_level(t, s):
            return 0.5

    class Half(_Settings):
        @staticmethod
        def second_level(t, s):
            return s[:2]

    with pytest.raises(ValueError, match=r"second_level rule must return s as t and s come, a float tensor \(4,\); "
                                         r"got float"):
        StepNoise.draw((4, 8, 3), Scalar(), torch.Generator().manual_seed(0), "cpu")
    with pytest.raises(ValueError, match=r"a float tensor \(4,\); got \(2,\) torch\.float32"):
        StepNoise.draw((4, 8, 3), Half(), torch.Generator().manual_seed(0), "cpu")


def test_dual_plan_levels_and_plain_weights():
    x0 = torch.randn(4, 8, 3)
    view = DualTimestepPlan().draw(x0, _resolve(), torch.Generator().manual_seed(1), (0, 1))
    assert view.fm_weight is None and view.rep_weight is None and view.channels is None
    dual = StepNoise.draw((4, 8, 3), _resolve(), torch.Generator().manual_seed(1), "cpu").dual
    assert torch.equal(view.student.dense, dual.tau) and torch.equal(view.teacher.model, dual.tau_min)
    assert torch.equal(view.noised(x0, view.teacher), (1 - dual.tau_min[:, None, None]) * x0
                       + dual.tau_min[:, None, None] * view.noise)
    flat = DualTimestepPlan().draw(x0, _resolve("flow_matching"), None, (0, 1))
    assert flat.student.model.shape == (4,)  # no mask: one level per sample


def test_plan_for_needs_both_schedule_and_groups():
    sched = TokenSchedule((TokenGroup("a", self_flow=True),), (ScheduleMode("m", 1.0),))
    groups = torch.zeros(8, dtype=torch.long)
    assert isinstance(plan_for(sched, groups), TokenSchedulePlan)
    assert isinstance(plan_for(sched, None), DualTimestepPlan) and isinstance(plan_for(None, groups), DualTimestepPlan)
