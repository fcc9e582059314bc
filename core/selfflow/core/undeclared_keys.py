"""The keys of a config section that a pydantic model would silently drop.

pydantic ignores keys a model does not declare unless its ``model_config`` says ``extra="forbid"``. Plug-ins'
models (a modality's ``Options``, a backbone's config) need not say so, and a misspelt key would then train on
the default: core refuses such keys itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel


def undeclared_keys(model: type[BaseModel], given: Mapping[str, Any] | None) -> list[str]:
    """The keys of ``given`` that ``model`` neither declares (by name or alias) nor keeps: empty when it forbids
    or allows extra keys, whose handling is then its own."""
    if model.model_config.get("extra") not in (None, "ignore"):
        return []
    known = {k for name, field in model.model_fields.items() for k in (name, field.alias) if k}
    return sorted(set(given or {}) - known)
