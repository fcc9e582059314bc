"""The open backbone registry: ``model.arch`` → the config class that validates the run config's ``model``
section and the module class that :func:`build_backbone` instantiates from it.

The built-in ``mmdit`` and ``dit`` are registered here. Other packages add backbones without touching core:

- call :func:`register_backbone` (tests, notebooks), or
- advertise an entry point in the group ``selfflow.backbones``: ``arch = "package.module:SPEC"``, where
  ``SPEC`` is a ``(config_cls, module_cls)`` pair (e.g. a :class:`BackboneSpec`) or a function of no
  arguments returning one (to defer heavy imports). It is loaded the first time a config names ``arch``.

``config_cls`` is a pydantic model satisfying :class:`~.backbone_protocol.BackboneConfig` whose ``arch``
field defaults to the registered name; ``module_cls(config)`` builds a
:class:`~.backbone_protocol.Backbone` (see :mod:`.block_walk` and :mod:`.projector` for the shared parts).
"""

from __future__ import annotations

import inspect
from importlib.metadata import EntryPoint, entry_points
from typing import Any, NamedTuple

import torch
from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticCustomError
from torch import nn

from .backbone_protocol import Backbone, BackboneConfig
from .dit import DiT, DiTConfig
from .mmdit import MMDiT, MMDiTConfig
from .registry import load_registered, refuse_builtin
from .undeclared_keys import undeclared_keys

ENTRY_POINT_GROUP = "selfflow.backbones"
DEFAULT_ARCH = "mmdit"


class BackboneSpec(NamedTuple):
    config_cls: type[BaseModel]
    module_cls: type[nn.Module]


_BACKBONES: dict[str, BackboneSpec] = {}
_FILLED_FIELDS = ("modalities", "num_classes", "projector_mult")
_PROTOCOL_MEMBERS = sorted({*Backbone.__annotations__, *(n for n in vars(Backbone) if not n.startswith("_"))})


BUILTIN_ARCHS = {"mmdit", "dit"}


def register_backbone(arch: str, config_cls: type[BaseModel], module_cls: type[nn.Module], *,
                      replace: bool = False) -> None:
    """Make ``model.arch: <arch>`` validate with ``config_cls`` and build ``module_cls(config)``; a built-in's
    arch only with ``replace=True``."""
    if not (isinstance(config_cls, type) and issubclass(config_cls, BaseModel)):
        raise TypeError(f"backbone {arch!r}: the config class must be a pydantic BaseModel, got {config_cls!r}")
    field = config_cls.model_fields.get("arch")
    if field is None or field.default != arch:
        raise TypeError(f"backbone {arch!r}: {config_cls.__name__} needs an 'arch' field defaulting to {arch!r}")
    if not (isinstance(module_cls, type) and issubclass(module_cls, nn.Module)):
        raise TypeError(f"backbone {arch!r}: the module class must be a torch.nn.Module, got {module_cls!r}")
    # what the trainer sets or reads on the config before building (BackboneConfig)
    if missing := [f for f in _FILLED_FIELDS if f not in config_cls.model_fields]:
        raise TypeError(f"backbone {arch!r}: {config_cls.__name__} needs the field(s) {', '.join(missing)}, which the "
                        "trainer fills before building (selfflow.core.backbone_protocol.BackboneConfig)")
    if "depth" not in config_cls.model_fields and not isinstance(getattr(config_cls, "depth", None), property):
        raise TypeError(f"backbone {arch!r}: {config_cls.__name__} needs depth (a field or a property): the number "
                        "of blocks, which the objective's layers are checked against")
    if module_cls.forward is nn.Module.forward:
        raise TypeError(f"backbone {arch!r}: {module_cls.__name__} does not define forward")
    signature = inspect.signature(module_cls.forward)
    try:
        signature.bind(None, "x", "ids", "t", None, modality=None, capture=(), stop_after=None, project=False)
    except TypeError as e:
        raise TypeError(f"backbone {arch!r}: {module_cls.__name__}.forward{signature} must take (self, x, ids, t, "
                        f"cond=None, *, modality, capture, stop_after, project) ({e})") from None
    if arch in _BACKBONES:  # the built-ins register themselves below
        refuse_builtin("backbone", arch, BUILTIN_ARCHS, replace)
    _BACKBONES[arch] = BackboneSpec(config_cls, module_cls)


def available_backbones() -> list[str]:
    """Registered archs and those installed packages advertise (not loaded)."""
    return sorted(set(_BACKBONES) | {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def backbone_spec(arch: str) -> BackboneSpec:
    """The config and module classes of ``arch`` (registered first, then the entry points)."""
    def load(ep: EntryPoint) -> BackboneSpec:
        try:
            spec = ep.load()
            if callable(spec) and not isinstance(spec, tuple | type):  # a factory; a class is a mistake, said below
                spec = spec()
        except Exception as e:  # a broken plug-in: say which one, not only the import error
            raise ValueError(f"backbone plug-in {arch!r} (entry point {ep.value!r}) failed to load: "
                             f"{type(e).__name__}: {e}") from e
        if not (isinstance(spec, tuple) and len(spec) == 2):
            raise ValueError(f"entry point {arch} = {ep.value!r} ({ENTRY_POINT_GROUP}) must give a "
                             f"(config_cls, module_cls) pair (or a function returning one), got {spec!r}")
        register_backbone(arch, *spec)
        return _BACKBONES[arch]

    return load_registered(
        _BACKBONES, ENTRY_POINT_GROUP, arch,
        lambda: (f"unknown backbone {arch!r}; known: {', '.join(available_backbones())} (backbone "
                 f"packages register under the {ENTRY_POINT_GROUP!r} entry point group)"), load)


def validate_model_config(value: Any) -> BaseModel:
    """The run config's ``model`` section → an instance of the config class of its ``arch`` (default
    ``mmdit``). Errors keep their key paths (``hidden_size``, ``arch``) for the config error message."""
    arch = value.get("arch", DEFAULT_ARCH) if isinstance(value, dict) else getattr(value, "arch", DEFAULT_ARCH)
    try:
        spec = backbone_spec(arch) if isinstance(arch, str) else None
    except KeyError as e:
        spec, reason = None, e.args[0]
    else:
        reason = f"must be a backbone name, one of {', '.join(available_backbones())}"
    if spec is None:
        raise ValidationError.from_exception_data("model", [{
            "type": PydanticCustomError("unknown_backbone", reason), "loc": ("arch",), "input": arch}])
    if isinstance(value, spec.config_cls):
        return value
    if isinstance(value, dict) and (unknown := undeclared_keys(spec.config_cls, value)):
        raise ValidationError.from_exception_data("model", [
            {"type": "extra_forbidden", "loc": (k,), "input": value[k]} for k in unknown])
    return spec.config_cls.model_validate(value)


def build_backbone(cfg: BackboneConfig) -> nn.Module:
    """The backbone a validated model config describes, checked against the backbone protocol."""
    try:
        spec = backbone_spec(cfg.arch)
    except KeyError as e:
        raise ValueError(e.args[0]) from None
    model = spec.module_cls(cfg)
    missing = protocol_gaps(model)
    if missing:
        raise ValueError(f"backbone {cfg.arch!r} ({spec.module_cls.__name__}) lacks {missing} of the backbone "
                        "protocol (selfflow.core.backbone_protocol.Backbone)")
    return model


def protocol_gaps(model: nn.Module) -> list[str]:
    """The members of :class:`~.backbone_protocol.Backbone` that ``model`` lacks (empty: it satisfies it).

    Use this, not ``isinstance(model, Backbone)``: from Python 3.12 a runtime-checkable protocol looks members
    up statically (``inspect.getattr_static``) and misses what ``nn.Module`` keeps in its registries — a
    ``projector`` submodule — so a valid backbone reads as not one.
    """
    return [m for m in _PROTOCOL_MEMBERS if not hasattr(model, m)]


def count_parameters(cfg: BackboneConfig) -> int:
    """Parameters of the backbone ``cfg`` describes (fixed tables included), counted on the meta device."""
    with torch.device("meta"):
        model = build_backbone(cfg)
    return sum(p.numel() for p in model.parameters())


register_backbone("mmdit", MMDiTConfig, MMDiT)
register_backbone("dit", DiTConfig, DiT)
