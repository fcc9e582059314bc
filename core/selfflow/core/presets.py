"""Named presets for the backbone configs: a preset fills defaults, keys written explicitly win."""

from __future__ import annotations

from typing import Any


def apply_preset(data: Any, presets: dict[str, dict[str, Any]], what: str) -> Any:
    """Fill a raw config dict from ``presets[data["preset"]]``; keys given explicitly win. ``what`` names the
    preset kind in errors (``"model preset"``)."""
    if isinstance(data, dict) and data.get("preset") is not None:
        name = data["preset"]
        if not isinstance(name, str):
            raise ValueError(f"{what} must be a name, one of {sorted(presets)} (got {name!r})")
        if name not in presets:
            raise ValueError(f"unknown {what} {name!r}; choose one of {sorted(presets)}")
        data = {**presets[name], **data}
    return data
