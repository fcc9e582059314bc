"""How every ``selfflow eval`` command reports: the metrics JSON on stdout and, if asked, in a file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def report_results(results: dict[str, Any], out: str | Path | None) -> int:
    """Print ``results`` as JSON, write it to ``out`` when given; returns the exit code (0)."""
    text = json.dumps(results, indent=2)
    print(text)
    if out:
        Path(out).write_text(text + "\n")
    return 0
