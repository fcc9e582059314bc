"""The one table of the eval package's metrics: their ``selfflow eval`` subcommands and online evaluators.

Adding a metric is one module (reader → extractor → ``FeatureStats`` → ``checked_distance``) plus
one :data:`METRICS` entry naming its argparse registrar (``"module:function(subparsers)"``, which adds
the parser and sets ``func=handler``) and, if the trainer may call it during training, its evaluator
factories (``"module:Factory"``, ``Factory(modality)(media, labels) -> dict[str, float]``; a factory whose
class sets ``needs_model = True`` is called as ``(model)`` instead, with the EMA model: see core's
``Previewer.evaluate``).

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
    evaluators: tuple[tuple[str, str], ...] = ()  # (entry-point name, "module:Factory") for training


METRICS: dict[str, Metric] = {
    "adm": Metric("selfflow.eval.cli:add_adm_parser",
                  evaluators=(("inception_fid", "selfflow.eval.online_fid:InceptionFIDEvaluator"),)),
    "stats": Metric("selfflow.eval.cli:add_stats_parser"),
    "probe": Metric("selfflow.eval.cli:add_probe_parser",
                    evaluators=(("shapes_probe", "selfflow.eval.probe:ShapesProbeEvaluator"),
                                ("digits_probe", "selfflow.eval.digits_probe:DigitsProbeEvaluator"))),
    "linear-probe": Metric("selfflow.eval.cli_linear_probe:add_linear_probe_parser",
                           evaluators=(("linear_probe", "selfflow.eval.linear_probe:LinearProbeEvaluator"),)),
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
    return dict(e for m in METRICS.values() for e in m.evaluators)
