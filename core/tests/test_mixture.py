import pytest

from selfflow.core.mixture import ModalitySchedule


def test_frequencies_follow_the_weights():
    sched = ModalitySchedule({"image": 0.57, "video": 0.30, "audio": 0.13}, seed=0)
    draws = [sched.next() for _ in range(10_000)]
    for name, p in (("image", 0.57), ("video", 0.30), ("audio", 0.13)):
        assert abs(draws.count(name) / len(draws) - p) < 0.015
    assert sched.counts == {n: draws.count(n) for n in ("image", "video", "audio")}


def test_same_seed_same_sequence_and_resume():
    a, b = ModalitySchedule({"x": 1, "y": 1}, 3), ModalitySchedule({"x": 1, "y": 1}, 3)
    assert [a.next() for _ in range(50)] == [b.next() for _ in range(50)]
    state = a.state_dict()
    expected = [a.next() for _ in range(20)]
    c = ModalitySchedule({"x": 1, "y": 1}, 99)
    c.load_state_dict(state)
    assert [c.next() for _ in range(20)] == expected
    with pytest.raises(ValueError, match="was over"):
        ModalitySchedule({"x": 1}, 0).load_state_dict(state)
    with pytest.raises(ValueError, match="positive"):
        ModalitySchedule({"x": 0}, 0)
