"""The golden run: fixed-seed ~30-step trainings whose numbers must not change under a refactor.

``python reliability/golden_run.py record`` trains the tiny image, mixed and rt1 configs for a few steps
(one thread, fp32, CPU) and writes every logged loss, a checksum of the EMA weights and a checksum of each
sample file to ``reliability/golden_run.json``. ``... check`` trains again and compares: losses and
checksums must be bitwise equal. Run it before and after any change that should not change behaviour.
Bitwise holds on one machine: another CPU rounds differently (in the 8th digit), so on a new machine record at
the base commit first and check the change against that record.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "reliability" / "golden_run.json"

# Metric keys that measure the machine, not the model.
TIMING_KEYS = ("samples_per_s", "tokens_per_s", "mfu", "gpu_mem_gb", "lr_time", "seconds")

# Overrides shared by every golden run: few steps, everything logged, small previews, one thread.
COMMON = ["train.steps=30", "logging.every=1", "logging.plot_every=1000", "sample.every=0",
          "checkpoint.every=15", "train.num_threads=1", "sample.num_samples=4", "sample.steps=4"]

RUNS: dict[str, tuple[str, list[str]]] = {
    "image": ("configs/tiny/image.yaml", []),
    "mixed": ("configs/tiny/mixed.yaml", []),
    "rt1": ("configs/tiny/rt1.yaml", []),
}


def _sets(overrides: list[str]) -> list[str]:
    return [a for s in overrides for a in ("--set", s)]


def tensor_checksum(path: Path) -> str:
    """sha256 over the sorted tensors of a safetensors file (names, dtypes, shapes and bytes; not metadata)."""
    from safetensors.torch import load_file

    h = hashlib.sha256()
    for key, value in sorted(load_file(str(path)).items()):
        h.update(f"{key}:{value.dtype}:{tuple(value.shape)}".encode())
        h.update(value.contiguous().view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()


def run_one(name: str, out: Path) -> dict:
    config, extra = RUNS[name]
    cmd = [sys.executable, "-m", "selfflow.core.cli", "train", "--config", str(ROOT / config), "--no-progress",
           *_sets([*COMMON, *extra, f"output_dir={out}", f"name=golden-{name}"])]
    proc = subprocess.run(cmd, cwd=out, capture_output=True, text=True,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"golden run {name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    run_dir = out / f"golden-{name}"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [{k: v for k, v in r.items() if not any(k.startswith(t) for t in TIMING_KEYS)} for r in records]
    # MP4 bytes vary from run to run (the muxer's metadata); the GIF beside it holds the same frames.
    samples = {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
               for p in sorted((run_dir / "samples").rglob("*")) if p.is_file() and p.suffix != ".mp4"}
    return {"metrics": losses, "ema": tensor_checksum(run_dir / "ema.safetensors"), "samples": samples}


def compare(name: str, want: dict, got: dict) -> list[str]:
    problems = []
    if want["ema"] != got["ema"]:
        problems.append(f"{name}: EMA weights differ")
    if want["samples"] != got["samples"]:
        problems.append(f"{name}: sample files differ: want {want['samples']}, got {got['samples']}")
    for i, (a, b) in enumerate(zip(want["metrics"], got["metrics"], strict=False)):
        diff = {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}
        if diff:
            problems.append(f"{name}: metrics record {i} differs: {diff}")
            break
    if len(want["metrics"]) != len(got["metrics"]):
        problems.append(f"{name}: {len(want['metrics'])} metric records recorded, {len(got['metrics'])} now")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["record", "check"])
    ap.add_argument("--only", nargs="*", choices=sorted(RUNS), help="a subset of the runs")
    args = ap.parse_args()
    names = args.only or list(RUNS)
    results = {}
    with tempfile.TemporaryDirectory(prefix="selfflow-golden-") as tmp:
        for name in names:
            print(f"golden run: {name} …", flush=True)
            results[name] = run_one(name, Path(tmp))
    if args.action == "record":
        old = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
        GOLDEN.write_text(json.dumps({**old, **results}, indent=1, sort_keys=True) + "\n")
        print(f"wrote {GOLDEN}")
        return 0
    golden = json.loads(GOLDEN.read_text())
    problems = [p for n in names for p in compare(n, golden[n], results[n])]
    for p in problems:
        print("DIFFERS:", p)
    print("golden run: " + ("identical" if not problems else f"{len(problems)} difference(s)"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
