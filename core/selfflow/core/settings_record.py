"""The settings a resumable job began with, kept as a JSON file beside its output: a rerun with other settings
is refused — naming what changed — instead of mixing two jobs' results (``selfflow sample --out-dir``'s parts,
``prepare rt1``'s shards)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def changed_settings(path: Path, now: dict[str, Any], informative: tuple[str, ...] = ()) -> list[str]:
    """``"key: <then> then, <now> now"`` for each key whose value recorded at ``path`` differs from ``now``
    (keys of either side, sorted); empty when nothing is recorded yet or everything agrees. ``informative`` keys
    are recorded but never compared (where a thing lies, when what it holds is compared by another key)."""
    if not path.is_file():
        return []
    then = json.loads(path.read_text())
    return [f"{k}: {then.get(k)!r} then, {now.get(k)!r} now" for k in sorted(set(then) | set(now))
            if k not in informative and then.get(k) != now.get(k)]
