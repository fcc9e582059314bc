"""The benchmark modules import as ``benchmarks.*`` from the repository root, as ``benchmarks/run.py``
and ``benchmarks/quality.py`` arrange for themselves when run as scripts."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
