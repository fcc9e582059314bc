"""The metric registry: every subcommand and evaluator it names loads, and the entry points agree."""

from __future__ import annotations

import argparse
from importlib.metadata import distribution

from selfflow.core.registry import get_evaluator
from selfflow.eval.registry import METRICS, evaluators, load


def test_every_registrar_adds_its_subcommand() -> None:
    for name, metric in METRICS.items():
        sub = argparse.ArgumentParser().add_subparsers()
        load(metric.command)(sub)
        assert list(sub.choices) == [name], metric.command


def test_evaluator_entry_points_mirror_the_registry() -> None:
    eps = {ep.name: ep.value for ep in distribution("selfflow-eval").entry_points
           if ep.group == "selfflow.evaluators"}
    assert eps == evaluators() and eps  # eval/pyproject.toml lists exactly the registry's evaluators
    for name, spec in evaluators().items():
        assert get_evaluator(name) is load(spec)  # what the trainer gets is what the registry names
