"""Numerical faults: NaN batches (``SELFFLOW_FAULT_NAN_AT``) in a tiny training run.

An isolated NaN batch must be skipped (no optimizer or EMA update, ``skipped_steps`` counted in
``metrics.jsonl``) and the run must finish with finite losses; ``train.max_nonfinite_steps`` NaN steps in a
row must stop the run cleanly (exit status 3, a message naming the last good checkpoint, no traceback).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

from .common import ROOT, Outcome, Timer, run, train_cmd

SETS = ("train.steps=12", "train.batch_size=2", "sample.every=0", "checkpoint.every=4",
        "train.max_nonfinite_steps=3")


def run_all(work: Path | None = None) -> list[Outcome]:
    from selfflow.core.metrics import read_metrics

    work = Path(work or ROOT / "runs" / "reliability" / "numerical")
    work.mkdir(parents=True, exist_ok=True)
    skip = Outcome("numerical", "a NaN batch", "step skipped and counted; the run finishes with finite losses")
    stop = Outcome("numerical", "NaN batches in a row (train.max_nonfinite_steps=3)",
                   "the run stops cleanly (exit 3) naming the last good checkpoint")
    for spec in ("2", "5,9", "12"):
        name = f"nan_{spec.replace(',', '_')}"
        shutil.rmtree(work / name, ignore_errors=True)
        with Timer(skip):
            proc = run(train_cmd(work, name, *SETS), SELFFLOW_FAULT_NAN_AT=spec)
        recs = read_metrics(work / name / "metrics.jsonl") if (work / name / "metrics.jsonl").is_file() else []
        bad = {int(s) for s in spec.split(",")}
        finite = all(math.isfinite(r["loss"]) for r in recs if r["step"] not in bad)
        ok = (proc.returncode == 0 and len(recs) == 12 and recs[-1]["skipped_steps"] == len(bad) and finite
              and all(r.get("skipped") == 1.0 for r in recs if r["step"] in bad))
        for _ in bad:
            skip.record(ok, crash=proc.returncode != 0, why=f"NaN at {spec}: exit {proc.returncode}: "
                                                          f"{proc.stderr[-500:]}")
    for spec in ("2,3,4", "6,7,8,9"):
        name = f"nanrow_{spec.replace(',', '_')}"
        shutil.rmtree(work / name, ignore_errors=True)
        with Timer(stop):
            proc = run(train_cmd(work, name, *SETS), SELFFLOW_FAULT_NAN_AT=spec)
        ok = (proc.returncode == 3 and "selfflow: stopped: 3 optimizer steps in a row" in proc.stderr
              and "Traceback" not in proc.stderr)
        stop.record(ok, crash="Traceback" in proc.stderr, why=f"NaN at {spec}: exit {proc.returncode}: "
                                                               f"{proc.stderr[-500:]}")
    skip.note = "NaN batches at steps 2; 5 and 9; 12 of a 12-step run"
    stop.note = "NaN at steps 2-4 and 6-9"
    return [skip, stop]
