"""The keys of a config section that a pydantic model would silently drop, and what a misspelt one meant.

pydantic ignores keys a model does not declare unless its ``model_config`` says ``extra="forbid"``. Plug-ins'
models (a modality's ``Options``, a backbone's config) need not say so, and a misspelt key would then train on
the default: core refuses such keys itself, and :func:`did_you_mean` names the declared keys close to it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any, get_args

from pydantic import BaseModel


def undeclared_keys(model: type[BaseModel], given: Mapping[str, Any] | None) -> list[str]:
    """The keys of ``given`` that ``model`` neither declares (by name or alias) nor keeps: empty when it forbids
    or allows extra keys, whose handling is then its own."""
    if model.model_config.get("extra") not in (None, "ignore"):
        return []
    known = {k for name, field in model.model_fields.items() for k in (name, field.alias) if k}
    return sorted(set(given or {}) - known)


def did_you_mean(key: str, known: Iterable[str]) -> str:
    """`` — did you mean 'steps'?`` for a misspelt ``key``: the declared keys of close spelling (``stpes``), else
    those that contain it or that it contains (``depth`` → ``depth_double``, ``depth_single``); "" when none."""
    known = [k for k in known if k != key]
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.75) or [k for k in known if key in k or k in key][:3]
    return f" — did you mean {' or '.join(repr(k) for k in close)}?" if close else ""


def fields_along(model: Any, path: Iterable[Any]) -> list[str]:
    """The field names of the pydantic model(s) reached from ``model`` — a model, or a union of them (a modality's
    per-dataset options: the fields of all) — by following ``path`` (field names; list indices are stepped
    over); [] where the path cannot be followed."""
    models = _models_in(model)
    for part in path:
        if isinstance(part, int):
            continue
        fields = [m.model_fields[part] for m in models if part in m.model_fields]
        if not fields:
            return []
        models = _models_in(fields[0].annotation)
    return sorted({name for m in models for name in m.model_fields})


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _models_in(arg)]
