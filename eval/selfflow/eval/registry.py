"""The one table of the eval package's metrics: their ``selfflow eval`` subcommands and online evaluators.

Adding a metric is one module (reader → extractor → ``FeatureStats`` → ``checked_distance``) plus
one :data:`METRICS` entry naming its argparse registrar (``"module:function(subparsers)"``, which adds
the parser and sets ``func=handler``) and, if the trainer may call it during training, its evaluator
factory (``"module:Factory"``, ``Factory(modality)(media, labels) -> dict[str, float]``).

The trainer finds evaluators through core's ``selfflow.evaluators`` entry-point group
(``selfflow.core.registry.get_evaluator``); ``eval/pyproject.toml`` lists the same evaluators there
and a test keeps the two in step, so an evaluator is still registered here once.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Metric:
    command: str  # "module:function" adding `selfflow eval <name>` to an argparse subparsers object
    evaluator: tuple[str, str] | None = None  # (entry-point name, "module:Factory") for training


METRICS: dict[str, Metric] = {
    "adm": Metric("selfflow.eval.cli:add_adm_parser"),
    "stats": Metric("selfflow.eval.cli:add_stats_parser"),
    "probe": Metric("selfflow.eval.cli:add_probe_parser",
                    evaluator=("shapes_probe", "selfflow.eval.probe:ShapesProbeEvaluator")),
    "linear-probe": Metric("selfflow.eval.cli_linear_probe:add_linear_probe_parser"),
    "t2i": Metric("selfflow.eval.cli_media:add_t2i_parser"),
    "fvd": Metric("selfflow.eval.cli_media:add_fvd_parser"),
    "fad": Metric("selfflow.eval.cli_media:add_fad_parser"),
}


def load(spec: str) -> Any:
    """The object a ``"module:attribute"`` spec names (imports the module)."""
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def evaluators() -> dict[str, str]:
    """Online evaluators: entry-point name → ``"module:Factory"``."""
    return dict(m.evaluator for m in METRICS.values() if m.evaluator is not None)
