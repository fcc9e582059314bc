"""How core finds modalities and extra CLI commands without importing them.

Packages advertise themselves through Python entry points:

- group ``selfflow.modalities``: ``name = "package.module:ModalityClass"`` (a :class:`Modality` subclass);
- group ``selfflow.commands``: ``name = "package.module:register"``, a function ``register(subparsers)``
  that adds a subcommand to the ``selfflow`` CLI;
- group ``selfflow.evaluators``: ``name = "package.module:Factory"``, ``Factory(modality)`` returning a
  callable ``(media, labels) → {metric: value}`` used for online evaluation during training;
- group ``selfflow.objectives``: ``name = "package.module:KIND"``, an
  :class:`~selfflow.core.objective_kinds.ObjectiveKind` called ``name`` (a value of ``objective.kind``).

Tests and notebooks can also call :func:`register_modality` and :func:`register_objective` directly.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from .objective_kinds import BUILTIN_OBJECTIVES, ObjectiveKind

if TYPE_CHECKING:
    from .modality import Modality

_MODALITIES: dict[str, type[Modality]] = {}
_OBJECTIVES: dict[str, ObjectiveKind] = {kind.name: kind for kind in BUILTIN_OBJECTIVES}


def register_modality(cls: type[Modality]) -> type[Modality]:
    """Register a modality class under ``cls.name`` (usable as a decorator)."""
    _MODALITIES[cls.name] = cls
    return cls


def _entry_points(group: str) -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=group)}


def available_modalities() -> list[str]:
    return sorted(set(_MODALITIES) | set(_entry_points("selfflow.modalities")))


def get_modality(name: str) -> type[Modality]:
    """The modality class called ``name`` (explicitly registered first, then entry points)."""
    if name in _MODALITIES:
        return _MODALITIES[name]
    eps = _entry_points("selfflow.modalities")
    if name not in eps:
        raise KeyError(f"unknown modality {name!r}; installed: {available_modalities() or 'none'} "
                       "(modality packages register under the 'selfflow.modalities' entry point group)")
    cls = eps[name].load()
    _MODALITIES[name] = cls
    return cls


def command_registrars() -> dict[str, Any]:
    """``name → register(subparsers)`` for every installed CLI extension."""
    return {name: ep.load() for name, ep in sorted(_entry_points("selfflow.commands").items())}


def get_evaluator(name: str):
    """The evaluator factory registered as ``name`` (see the module docstring)."""
    eps = _entry_points("selfflow.evaluators")
    if name not in eps:
        raise KeyError(f"unknown evaluator {name!r}; installed: {sorted(eps) or 'none'} "
                       "(the eval package registers them under the 'selfflow.evaluators' group)")
    return eps[name].load()


def checkpoint_loaders() -> dict[str, Any]:
    """``name → load(path, options)`` for every installed released-checkpoint loader."""
    return {name: ep.load() for name, ep in sorted(_entry_points("selfflow.checkpoints").items())}


def register_objective(kind: ObjectiveKind) -> ObjectiveKind:
    """Register an objective kind under ``kind.name`` (a value of ``objective.kind``)."""
    _OBJECTIVES[kind.name] = kind
    return kind


def available_objectives() -> list[str]:
    return sorted(set(_OBJECTIVES) | set(_entry_points("selfflow.objectives")))


def get_objective(name: str) -> ObjectiveKind:
    """The objective kind called ``name`` (built-in or registered first, then entry points)."""
    if name in _OBJECTIVES:
        return _OBJECTIVES[name]
    eps = _entry_points("selfflow.objectives")
    if name not in eps:
        raise KeyError(f"unknown objective.kind {name!r}; known: {', '.join(available_objectives())} "
                       "(plug-ins register under the 'selfflow.objectives' entry point group)")
    kind = eps[name].load()
    if not isinstance(kind, ObjectiveKind) or kind.name != name:
        raise TypeError(f"entry point selfflow.objectives:{name} = {eps[name].value} must be an ObjectiveKind "
                        f"named {name!r}, got {kind!r}")
    _OBJECTIVES[name] = kind
    return kind
