"""What ``selfflow plugins`` shows: every extension the installed packages offer, each loaded and checked.

A plug-in is otherwise looked up only when a config names it, so one that cannot serve (its module does not
import, its entry point names the wrong object, its class breaks the contract) stays invisible until a run
fails. Loading each one here runs the same checks a run would (see :mod:`.registry` and :mod:`.backbones`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .backbones import BUILTIN_ARCHS, available_backbones, backbone_spec
from .backbones import ENTRY_POINT_GROUP as BACKBONE_GROUP
from .registry import (
    BUILTIN_OBJECTIVE_NAMES,
    available_evaluators,
    available_modalities,
    available_objectives,
    entry_point_values,
    get_evaluator,
    get_modality,
    get_objective,
)


@dataclass
class PluginStatus:
    name: str
    source: str  # "package.module:object" of its entry point, or "built-in"
    error: Exception | None  # why it cannot serve; None: loaded and checked


@dataclass
class PluginKind:
    title: str  # "modalities"
    setting: str  # where a config names one: "data.modality"
    group: str  # the entry point group
    names: Callable[[], list[str]]
    load: Callable[[str], Any]
    builtins: frozenset[str] = frozenset()  # names core defines itself: they come before any entry point


MODALITIES = PluginKind("modalities", "data.modality", "selfflow.modalities", available_modalities, get_modality)
KINDS = (
    MODALITIES,
    PluginKind("backbones", "model.arch", BACKBONE_GROUP, available_backbones, backbone_spec,
               frozenset(BUILTIN_ARCHS)),
    PluginKind("objective kinds", "objective.kind", "selfflow.objectives", available_objectives, get_objective,
               frozenset(BUILTIN_OBJECTIVE_NAMES)),
    PluginKind("online evaluators", "eval.evaluators", "selfflow.evaluators", available_evaluators, get_evaluator),
)


def plugin_statuses(kind: PluginKind) -> list[PluginStatus]:
    """Each extension of ``kind``, loaded (as a run would) and checked."""
    sources = entry_point_values(kind.group)
    out = []
    for name in kind.names():
        try:
            kind.load(name)
            error = None
        except (KeyError, ValueError, TypeError) as e:
            error = e
        if name in kind.builtins and name in sources:  # a run uses the built-in: say that the plug-in is ignored
            error = ValueError(f"the entry point {name} = {sources[name]} ({kind.group}) is ignored: the built-in "
                               f"{name} comes first; rename it")
        out.append(PluginStatus(name, "built-in" if name in kind.builtins else sources.get(name, "built-in"), error))
    return out
