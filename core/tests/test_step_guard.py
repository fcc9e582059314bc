import pytest

from selfflow.core.config import TrainConfig
from selfflow.core.step_guard import BadDataError, NonFiniteLossError, StepGuard


def test_bad_data_fraction_stops_the_run(tmp_path):
    guard = StepGuard(TrainConfig(max_bad_data_fraction=0.1), tmp_path)
    guard.check_data(100, 11, step=5)  # 11 of 111 < 10 %
    with pytest.raises(BadDataError, match=r"13 of 113 samples.*max_bad_data_fraction=0.1.*step 6.*none"):
        guard.check_data(0, 13, step=6)
    small = StepGuard(TrainConfig(max_bad_data_fraction=0.1), tmp_path)
    small.check_data(10, 20, step=1)  # too few samples to judge


def test_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path):
    (tmp_path / "step_00000004.pt").touch()
    guard = StepGuard(TrainConfig(max_nonfinite_steps=2), tmp_path)
    assert guard.accept(1.0, 2.0, step=1)
    assert not guard.accept(float("nan"), 1.0, step=2) and guard.skipped_steps == 1
    assert guard.accept(1.0, 1.0, step=3) and guard.nonfinite_in_a_row == 0  # a good step resets the count
    assert not guard.accept(1.0, float("inf"), step=4)
    with pytest.raises(NonFiniteLossError, match=r"2 optimizer steps in a row.*step 5.*step_00000004\.pt"):
        guard.accept(float("nan"), 1.0, step=5)


def test_counts_round_trip(tmp_path):
    guard = StepGuard(TrainConfig(), tmp_path)
    guard.check_data(32, 0, step=1)
    guard.accept(float("nan"), 1.0, step=1)
    again = StepGuard(TrainConfig(), tmp_path)
    again.load_state_dict(guard.state_dict())
    # the count in a row too: a resumed run stops where the uninterrupted one would (it used to start again at 0)
    assert (again.skipped_steps, again.data_samples, again.nonfinite_in_a_row) == (1, 32, 1)
    older = StepGuard(TrainConfig(), tmp_path)
    older.load_state_dict({"skipped_steps": 1, "data_samples": 32})  # a checkpoint from before it was kept
    assert older.nonfinite_in_a_row == 0
