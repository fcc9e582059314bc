"""How core finds modalities and extra CLI commands without importing them.

Packages advertise themselves through Python entry points:

- group ``selfflow.modalities``: ``name = "package.module:ModalityClass"`` (a :class:`Modality` subclass);
- group ``selfflow.commands``: ``name = "package.module:register"``, a function ``register(subparsers)``
  that adds a subcommand to the ``selfflow`` CLI;
- group ``selfflow.evaluators``: ``name = "package.module:Factory"``, ``Factory(modality)`` returning a
  callable ``(media, labels) → {metric: value}`` used for online evaluation during training (one whose
  ``needs_model`` is true is called with the EMA model instead of samples);
- group ``selfflow.objectives``: ``name = "package.module:KIND"``, an
  :class:`~selfflow.core.objective_kinds.ObjectiveKind` called ``name`` (a value of ``objective.kind``);
- group ``selfflow.backbones``: ``arch = "package.module:SPEC"``, a :class:`~selfflow.core.backbones.BackboneSpec`
  (a value of ``model.arch``; looked up by :mod:`.backbones`);
- group ``selfflow.checkpoints``: ``name = "package.module:load"``, a loader of released checkpoints for
  ``selfflow sample --official-ckpt``.

A modality's entry-point name must be its class's ``name``, and the class must fulfil the :class:`Modality` contract
(:func:`check_modality_class`); a plug-in that fails to import is an error naming its entry point. Worked
examples of each kind of plug-in are in ``examples/plugins/``.

Tests and notebooks can also call :func:`register_modality`, :func:`register_objective` and
:func:`~selfflow.core.backbones.register_backbone` directly.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Any, TypeVar

from .objective_kinds import BUILTIN_OBJECTIVES, ObjectiveKind

if TYPE_CHECKING:
    from .modality import Modality

T = TypeVar("T")

_MODALITIES: dict[str, type[Modality]] = {}
_OBJECTIVES: dict[str, ObjectiveKind] = {kind.name: kind for kind in BUILTIN_OBJECTIVES}


def check_modality_class(cls: Any, where: str) -> None:
    """Refuse, naming ``where`` it came from, what cannot serve as a modality: not a :class:`Modality` subclass,
    one that leaves abstract methods unimplemented or lacks a class attribute (``name``, ``Options``,
    ``default_mask_ratio``), or a ``sample_conditions`` that does not take ``(samples, device)``. Checked when
    the class is registered, so a plug-in's mistake is one line at start-up rather than a failure at its first
    preview."""
    from .modality import Modality  # here: modality.py imports much of core, this module little

    if not (isinstance(cls, type) and issubclass(cls, Modality)):
        raise ValueError(f"{where} must be a Modality subclass, got {cls!r}")
    if missing := sorted(getattr(cls, "__abstractmethods__", ())):
        raise ValueError(f"{where}: modality class {cls.__name__} does not implement {', '.join(missing)}")
    # the class attributes the trainer reads before any method runs
    name, ratio = getattr(cls, "name", None), getattr(cls, "default_mask_ratio", None)
    if not (isinstance(name, str) and name):
        raise ValueError(f"{where}: modality class {cls.__name__} needs a class attribute name (a non-empty str, "
                         f"its data.modality), got {name!r}")
    if not hasattr(cls, "Options"):
        raise ValueError(f"{where}: modality class {cls.__name__} needs a class attribute Options (the pydantic "
                         "model of its data.options)")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:
        raise ValueError(f"{where}: modality class {cls.__name__} needs a class attribute default_mask_ratio (R_M, "
                         f"in [0, 1]), got {ratio!r}")
    signature = inspect.signature(cls.sample_conditions)
    try:
        signature.bind(None, 1, "cpu")
    except TypeError as e:
        raise ValueError(f"{where}: {cls.__name__}.sample_conditions{signature} must take (self, samples, device) "
                         f"— samples: indices (N,) or a count ({e})") from None


def register_modality(cls: type[Modality]) -> type[Modality]:
    """Register a modality class under ``cls.name`` (usable as a decorator); see :func:`check_modality_class`."""
    check_modality_class(cls, f"register_modality({getattr(cls, '__name__', cls)!r})")
    _note_plugin(cls.__module__)
    _MODALITIES[cls.name] = cls
    return cls


def _entry_points(group: str) -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=group)}


def duplicate_entry_points(group: str, name: str) -> list[str]:
    """The different ``"package.module:object"`` values installed packages give the entry point ``name`` of
    ``group`` when there are several: which one would load depends on the order of ``sys.path``, so
    :func:`load_registered` refuses to pick."""
    values = sorted({ep.value for ep in entry_points(group=group) if ep.name == name})
    return values if len(values) > 1 else []


def refuse_builtin(kind: str, name: str, builtins: set[str], replace: bool) -> None:
    """``register_*(name)`` may not silently replace a built-in (a plug-in's ``self_flow`` would change what every
    config of that name trains); ``replace=True`` says it is meant."""
    if name in builtins and not replace:
        raise ValueError(f"{kind} {name!r} is built in: register yours under another name (or pass replace=True "
                         "to replace the built-in in this process)")


def entry_point_values(group: str) -> dict[str, str]:
    """``name → "package.module:object"`` of the entry points installed in ``group`` (none loaded)."""
    return {name: ep.value for name, ep in _entry_points(group).items()}


def load_registered(table: dict[str, T], group: str, name: str, unknown: Callable[[], str],
                    load: Callable[[EntryPoint], T] = EntryPoint.load) -> T:
    """``table[name]`` if registered; else the entry point ``name`` of ``group``, loaded once and cached in
    ``table``; else ``KeyError(unknown())``. The one lookup behind every registry of core. A plug-in that
    fails to load (its module does not import, ``load`` refuses what it holds) is a ``ValueError`` naming the
    entry point: one line at the CLI, not a traceback from inside importlib."""
    if name in table:
        return table[name]
    eps = _entry_points(group)
    if name not in eps:
        raise KeyError(unknown())
    if twins := duplicate_entry_points(group, name):
        raise ValueError(f"several installed packages register the {group} entry point {name}: {', '.join(twins)} "
                         "(which one loads would depend on sys.path): uninstall or rename all but one")
    try:
        table[name] = load(eps[name])
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"the {group} entry point {name} = {eps[name].value} failed to load: "
                         f"{type(e).__name__}: {e}") from e
    _note_plugin(eps[name].module)
    return table[name]


_PLUGIN_PACKAGES: set[str] = set()  # top-level packages of the plug-ins loaded or registered in this process


def _note_plugin(module: str) -> None:
    if (package := module.split(".")[0]) != "selfflow":
        _PLUGIN_PACKAGES.add(package)


def plugin_frame(error: BaseException) -> str | None:
    """``file:line in function`` of the innermost frame of ``error``'s traceback that runs a plug-in's code, if any:
    the CLI adds it to the one-line message of an error a plug-in raised (a ``KeyError: 'label'`` from its
    ``encode`` would otherwise read ``selfflow: error: label``)."""
    where, tb = None, error.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if str(frame.f_globals.get("__name__", "")).split(".")[0] in _PLUGIN_PACKAGES:
            where = f"{frame.f_code.co_filename}:{tb.tb_lineno} in {frame.f_code.co_name}"
        tb = tb.tb_next
    return where


def available_modalities() -> list[str]:
    return sorted(set(_MODALITIES) | set(_entry_points("selfflow.modalities")))


def get_modality(name: str) -> type[Modality]:
    """The modality class called ``name`` (explicitly registered first, then entry points)."""
    def load(ep: EntryPoint) -> type[Modality]:
        cls = ep.load()
        check_modality_class(cls, f"entry point selfflow.modalities:{name} = {ep.value}")
        # the model's projections and every record are keyed by cls.name: another entry-point name would train,
        # then fail at the first preview
        if getattr(cls, "name", None) != name:
            raise ValueError(f"entry point selfflow.modalities:{name} = {ep.value} must be a Modality class whose "
                             f"name is {name!r}, got name {getattr(cls, 'name', None)!r}")
        return cls

    return load_registered(
        _MODALITIES, "selfflow.modalities", name,
        lambda: (f"unknown modality {name!r}; installed: {available_modalities() or 'none'} "
                 "(modality packages register under the 'selfflow.modalities' entry point group)"), load)


def command_registrars() -> dict[str, Any]:
    """``name → register(subparsers)`` for every installed CLI extension."""
    return {name: ep.load() for name, ep in sorted(_entry_points("selfflow.commands").items())}


_EVALUATORS: dict[str, Any] = {}


def available_evaluators() -> list[str]:
    return sorted(_entry_points("selfflow.evaluators"))


def get_evaluator(name: str):
    """The evaluator factory registered as ``name`` (see the module docstring)."""
    return load_registered(
        _EVALUATORS, "selfflow.evaluators", name,
        lambda: (f"unknown evaluator {name!r}; installed: {available_evaluators() or 'none'} "
                 "(the eval package registers them under the 'selfflow.evaluators' group)"))


def checkpoint_loaders() -> dict[str, Any]:
    """``name → load(path, options)`` for every installed released-checkpoint loader."""
    return {name: ep.load() for name, ep in sorted(_entry_points("selfflow.checkpoints").items())}


BUILTIN_OBJECTIVE_NAMES = {kind.name for kind in BUILTIN_OBJECTIVES}


def register_objective(kind: ObjectiveKind, *, replace: bool = False) -> ObjectiveKind:
    """Register an objective kind under ``kind.name`` (a value of ``objective.kind``); a built-in's name only with
    ``replace=True``."""
    if not isinstance(kind, ObjectiveKind):
        raise TypeError(f"register_objective takes an ObjectiveKind, got {kind!r}"[:200])
    refuse_builtin("objective kind", kind.name, BUILTIN_OBJECTIVE_NAMES, replace)
    _OBJECTIVES[kind.name] = kind
    return kind


def available_objectives() -> list[str]:
    return sorted(set(_OBJECTIVES) | set(_entry_points("selfflow.objectives")))


def get_objective(name: str) -> ObjectiveKind:
    """The objective kind called ``name`` (built-in or registered first, then entry points)."""
    def load(ep: EntryPoint) -> ObjectiveKind:
        kind = ep.load()
        if not isinstance(kind, ObjectiveKind) or kind.name != name:
            got = f"an ObjectiveKind named {kind.name!r}" if isinstance(kind, ObjectiveKind) else repr(kind)[:120]
            raise ValueError(f"entry point selfflow.objectives:{name} = {ep.value} must be an ObjectiveKind "
                             f"named {name!r}, got {got}")
        return kind

    return load_registered(
        _OBJECTIVES, "selfflow.objectives", name,
        lambda: (f"unknown objective.kind {name!r}; known: {', '.join(available_objectives())} "
                 "(plug-ins register under the 'selfflow.objectives' entry point group)"), load)
