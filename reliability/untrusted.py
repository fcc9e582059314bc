"""Untrusted files: a checkpoint whose pickle would run code, and configured output paths that escape.

A pickle whose ``__reduce__`` would create a marker file is planted where the project reads checkpoints —
``load_checkpoint``, the newest checkpoint of a run being resumed, ``train.init_from``, ``selfflow sample
--run`` — and must be refused with a clear error while the marker never appears. Every ``torch.load`` in
the product packages must pass ``weights_only=True`` (a static scan; weights otherwise come from
safetensors). Run names that would put the run directory outside ``output_dir`` must be rejected before
anything is written.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import torch

from .common import ROOT, Outcome, Timer, run, train_cmd

PACKAGES = ("core", "text", "image", "video", "audio", "robotics", "eval")


class _Exploit:
    """Unpickling this calls ``os.system`` (it would create ``marker``)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {"w": torch.zeros(1)}, "ema": {"w": torch.zeros(1)}, "x": _Exploit(marker)}, path)


def evil_pickles(work: Path) -> list[Outcome]:
    from selfflow.core.checkpoint import load_checkpoint

    out = Outcome("untrusted", "checkpoint pickle that would run code",
                  "refused with a clear error; the code never runs")
    marker = work / "PWNED"
    marker.unlink(missing_ok=True)
    evil = work / "evil.pt"
    _plant(evil, marker)

    with Timer(out):  # 1. the loader itself
        try:
            load_checkpoint(evil)
            out.record(False, why="load_checkpoint accepted the pickle")
        except ValueError as e:
            out.record("weights_only" in str(e) and not marker.exists(), why=str(e)[:300])

    # 2. resuming a run whose newest checkpoint is the pickle; 3. fine-tuning from it; 4. sampling from it
    shutil.rmtree(work / "victim", ignore_errors=True)
    _plant(work / "victim" / "checkpoints" / "step_00000099.pt", marker)
    cases = {
        "resume": train_cmd(work, "victim", "train.steps=2", "train.batch_size=2"),
        "init_from": train_cmd(work, "finetune", "train.steps=2", "train.batch_size=2", f"train.init_from={evil}"),
    }
    for label, cmd in cases.items():
        with Timer(out):
            proc = run(cmd)
        ok = (proc.returncode == 2 and "weights_only" in proc.stderr and "Traceback" not in proc.stderr
              and not marker.exists())
        out.record(ok, crash="Traceback" in proc.stderr, why=f"{label}: exit {proc.returncode}: {proc.stderr[-500:]}")
    (work / "victim" / "config.yaml").write_text((ROOT / "configs" / "tiny" / "image.yaml").read_text())
    with Timer(out):
        proc = run([sys.executable, "-m", "selfflow.core.cli", "sample", "--run", str(work / "victim"),
                    "--num", "2", "--device", "cpu", "--out", str(work / "grid")])
    ok = proc.returncode == 2 and "weights_only" in proc.stderr and "Traceback" not in proc.stderr
    out.record(ok and not marker.exists(), crash="Traceback" in proc.stderr,
               why=f"sample: exit {proc.returncode}: {proc.stderr[-500:]}")
    out.note = "load_checkpoint, resume, train.init_from, selfflow sample --run"
    return [out]


def static_scan() -> list[Outcome]:
    out = Outcome("untrusted", "torch.load / pickle call sites in the product packages",
                  "every torch.load passes weights_only=True; no pickle.load")
    calls = re.compile(r"torch\.load\(|pickle\.loads?\(|weights_only\s*=\s*False")
    with Timer(out):
        for pkg in PACKAGES:
            for f in sorted((ROOT / pkg / "selfflow").rglob("*.py")):
                text = f.read_text()
                for m in calls.finditer(text):
                    line_end = text.find("\n", m.end())
                    call = text[m.start(): line_end if line_end > 0 else None]
                    if call.lstrip().startswith("#") or '"' in text[text.rfind("\n", 0, m.start()):m.start()]:
                        continue  # inside a message or comment
                    safe = m.group(0).startswith("torch.load") and "weights_only=True" in call
                    out.record(safe, why=f"{f.relative_to(ROOT)}: {call.strip()[:120]}")
    out.note = f"{out.trials} call sites"
    return [out]


def output_paths(work: Path) -> list[Outcome]:
    out = Outcome("untrusted", "run name escaping output_dir (.., absolute)",
                  "rejected naming the key before anything is written")
    names = ["../escaped", "a/../../escaped", str(work / "abs-escaped"), ".."]
    sandbox = work / "sandbox" / "runs"
    shutil.rmtree(work / "sandbox", ignore_errors=True)
    sandbox.mkdir(parents=True)
    for name in names:
        with Timer(out):
            proc = run(train_cmd(sandbox, name, "train.steps=1", "train.batch_size=2"))
        escaped = [p for p in (work / "sandbox").rglob("*") if p.name in ("escaped", "abs-escaped")]
        escaped += [p for p in (work,) if (p / "abs-escaped").exists()]
        ok = (proc.returncode == 2 and re.search(r"\bname: .*relative path", proc.stderr) is not None
              and not escaped and "Traceback" not in proc.stderr)
        out.record(ok, crash="Traceback" in proc.stderr, why=f"name={name!r}: exit {proc.returncode}, "
                                                            f"escaped {escaped}: {proc.stderr[-300:]}")
    out.note = "via `selfflow train --set name=…`"
    return [out]


def run_all(work: Path | None = None) -> list[Outcome]:
    work = Path(work or ROOT / "runs" / "reliability" / "untrusted")
    work.mkdir(parents=True, exist_ok=True)
    return [*evil_pickles(work), *static_scan(), *output_paths(work)]
