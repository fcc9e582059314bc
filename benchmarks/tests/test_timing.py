"""The benchmark clocks: a step alone vs steps in a row."""

import pytest

from benchmarks import timing


def test_steady_time_is_per_call_over_rounds_of_calls_in_a_row(monkeypatch):
    clock = iter(range(0, 1000, 10))  # every perf_counter reading 10 s after the last
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    calls = []
    per_call = timing.steady_time(lambda: calls.append(1), repeats=3, steps=4, warmup=2)
    assert len(calls) == 2 + 3 * 4  # warm-up, then 3 rounds of 4 calls, each round read twice
    assert per_call == pytest.approx(10 / 4)  # one round's 10 s over its 4 calls


def test_interleaved_medians_calls_each_in_turn_and_returns_each_median(monkeypatch):
    order = []
    clock = iter(range(1000))
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    medians = timing.interleaved_medians([lambda: order.append("a"), lambda: order.append("b"),
                                   lambda: (order.append("c"), next(clock))], repeats=3, warmup=1)
    assert order == ["a", "b", "c"] * 4
    assert medians == [1, 1, 2]  # c's call reads the clock once more: two ticks


def test_interleaved_times_keeps_every_round_of_each(monkeypatch):
    clock = iter(range(1000))
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    slow_later = iter([0, 0, 2, 5])  # b's extra clock reads: none while warming up and in round 0, then 2, 5
    times = timing.interleaved_times([lambda: None, lambda: [next(clock) for _ in range(next(slow_later))]],
                                     repeats=3, warmup=1)
    assert times == [[1, 1, 1], [1, 3, 6]]  # each call's own seconds, in round order: a ratio per round
