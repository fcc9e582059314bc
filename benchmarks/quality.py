"""``make bench-quality``: vanilla flow matching vs Self-Flow and its two ablations on the synthetic shapes.

Four objectives × three seeds of the tiny MMDiT (configs/tiny/image.yaml, pixel space 32×32, 10 classes),
with **identical compute in the sense of equal optimizer steps and equal batch** (the paper compares
methods at equal training iterations): every run takes the same number of steps of the same batch, so a
Self-Flow run costs ~1.3× the wall time of a flow-matching run (its EMA teacher's extra forward; the wall
time per run is reported). Seed k gives every method the same initialisation, data order and
evaluation noise, so differences are paired.

Every ``--eval-every`` steps the trainer's online evaluator (``eval.every``, the ``shapes_probe``
evaluator of ``selfflow eval probe``) samples ``--eval-samples`` images from the EMA model (Euler, 10 steps,
CFG 2.0, classes cycling) and scores probe-FD and conditional accuracy. Writes ``OUT/{table.md,
results.json, curves.png}``; each run lives in ``OUT/runs/<method>-s<seed>`` and re-running the command
skips finished runs and resumes interrupted ones from their last checkpoint.

Usage: python benchmarks/quality.py [--quick] [--jobs 2] [--steps N] [--seeds 0 1 2] [--report-only]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

METHODS = ["flow_matching", "self_flow", "self_flow_no_mask", "self_flow_no_rep"]
LABELS = {"flow_matching": "vanilla FM", "self_flow": "Self-Flow",
          "self_flow_no_mask": "Self-Flow w/o masking", "self_flow_no_rep": "Self-Flow w/o rep. loss"}
FULL = {"steps": 1000, "batch_size": 16, "eval_every": 250, "eval_samples": 200, "seeds": [0, 1, 2],
        "out": "runs/bench-quality"}
QUICK = {"steps": 40, "batch_size": 8, "eval_every": 20, "eval_samples": 20, "seeds": [0, 1],
         "out": "runs/bench-quality-quick"}
SAMPLER = ["sample.solver=euler", "sample.steps=10", "sample.cfg_scale=2.0", "sample.num_samples=20"]


def run_name(method: str, seed: int) -> str:
    return f"{method}-s{seed}"


def train_command(method: str, seed: int, s: dict, runs_dir: Path, threads: int) -> list[str]:
    sets = [f"name={run_name(method, seed)}", f"output_dir={runs_dir}", f"objective.kind={method}",
            f"train.seed={seed}", f"train.steps={s['steps']}", f"train.batch_size={s['batch_size']}",
            f"eval.every={s['eval_every']}", f"eval.num_samples={s['eval_samples']}",
            f"checkpoint.every={s['eval_every']}", "checkpoint.keep_last=1", "sample.every=0",
            f"logging.plot_every={s['steps']}", f"train.num_threads={threads}", *SAMPLER]
    cmd = [sys.executable, "-m", "selfflow.core.cli", "train", "--config", str(ROOT / "configs/tiny/image.yaml"),
           "--no-progress"]
    for kv in sets:
        cmd += ["--set", kv]
    return cmd


def read_run(run_dir: Path, method: str, seed: int, batch: int) -> dict | None:
    """The evaluations (and timing, when finished) of one run, or None before its first evaluation."""
    from benchmarks.quality_report import read_evals
    from selfflow.core.metrics import read_metrics

    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return None
    records = read_metrics(metrics)
    evals = read_evals(records)
    if not evals:
        return None
    done = run_dir / "bench_result.json"
    info = json.loads(done.read_text()) if done.is_file() else {}
    rates = sorted(r["samples_per_s"] for r in records if r.get("samples_per_s"))
    out = {"method": method, "seed": seed, "evals": evals, "finished": bool(info),
           "steps": max(r["step"] for r in records),
           "wall_s": None if info.get("resumed") else info.get("wall_s")}  # a resumed run's wall is partial
    if rates:
        out["s_per_step"] = batch / rates[len(rates) // 2]  # median over log windows (training only)
    return out


def run_one(method: str, seed: int, s: dict, runs_dir: Path, threads: int) -> str:
    name = run_name(method, seed)
    run_dir = runs_dir / name
    done = run_dir / "bench_result.json"
    if done.is_file() and json.loads(done.read_text()).get("steps") == s["steps"]:
        return f"{name}: finished earlier, skipped"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    resumed = any((run_dir / "checkpoints").glob("step_*.pt"))
    t0 = time.perf_counter()
    with open(runs_dir / f"{name}.log", "a") as log:
        proc = subprocess.run(train_command(method, seed, s, runs_dir, threads), stdout=log,
                              stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return f"{name}: FAILED (exit {proc.returncode}, see {runs_dir / (name + '.log')})"
    done.write_text(json.dumps({"steps": s["steps"], "batch_size": s["batch_size"], "wall_s": wall,
                                "threads": threads, "resumed": resumed}, indent=1))
    return f"{name}: done in {wall / 60:.1f} min" + (" (resumed)" if resumed else "")


def report(s: dict, out: Path, wall_total: float | None = None) -> str:
    from benchmarks.quality_report import (
        aggregate,
        markdown_table,
        paired_differences,
        plot_curves,
    )

    runs = [r for m in s["methods"] for seed in s["seeds"]
            if (r := read_run(out / "runs" / run_name(m, seed), m, seed, s["batch_size"])) is not None]
    if not runs:
        return "no evaluations yet"
    summary = aggregate(runs, s["methods"])
    diffs = paired_differences(runs, "flow_matching")
    table = markdown_table(summary, diffs, LABELS["flow_matching"], LABELS)
    unfinished = [run_name(r["method"], r["seed"]) for r in runs if not r["finished"]]
    if unfinished:
        table += f"\nunfinished runs (partial curves included): {', '.join(unfinished)}\n"
    title = (f"tiny MMDiT on synthetic shapes, {s['steps']} steps × batch {s['batch_size']}, "
             f"{len(s['seeds'])} seeds; {s['eval_samples']} samples per eval")
    plot_curves(summary, out / "curves.png", LABELS, title)
    (out / "table.md").write_text(table)
    meta = {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "settings": s, "identical_compute": "equal optimizer steps and batch size",
            "sampler": SAMPLER, "wall_total_s": wall_total}
    try:
        import torch

        meta["torch"] = torch.__version__
    except ImportError:
        pass
    (out / "results.json").write_text(json.dumps(
        {"meta": meta, "runs": runs, "paired_vs_flow_matching": diffs,
         "summary": summary}, indent=1))
    return table


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke setting: 40 steps, 2 seeds, tiny evals")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--eval-every", type=int)
    ap.add_argument("--eval-samples", type=int)
    ap.add_argument("--seeds", type=int, nargs="+")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                    help="runs in parallel (default: 2); each gets cpus // jobs threads")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--report-only", action="store_true", help="only aggregate what exists")
    args = ap.parse_args()
    s = dict(QUICK if args.quick else FULL)
    for key in ("steps", "batch_size", "eval_every", "eval_samples", "seeds", "out"):
        if getattr(args, key) is not None:
            s[key] = getattr(args, key)
    s["methods"] = args.methods
    s["out"] = str(s["out"])
    out = ROOT / s["out"] if not Path(s["out"]).is_absolute() else Path(s["out"])
    out.mkdir(parents=True, exist_ok=True)
    wall_total = None
    if not args.report_only:
        from selfflow.eval.probe import train_shapes_probe

        train_shapes_probe()  # build the cached probe once, before the parallel runs need it
        threads = max(1, (os.cpu_count() or 1) // max(1, args.jobs))
        jobs = [(m, seed) for seed in s["seeds"] for m in s["methods"]]  # seed-major: partial results stay balanced
        print(f"bench-quality: {len(jobs)} runs of {s['steps']} steps × batch {s['batch_size']}, "
              f"{args.jobs} in parallel × {threads} thread(s) → {out}", flush=True)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            futures = [pool.submit(run_one, m, seed, s, out / "runs", threads) for m, seed in jobs]
            for future in as_completed(futures):
                msg = future.result()
                print(f"  [{(time.perf_counter() - t0) / 60:5.1f} min] {msg}", flush=True)
        wall_total = time.perf_counter() - t0
        print(f"all runs: {wall_total / 60:.1f} min")
    print(report(s, out, wall_total))
    print(f"wrote {out / 'table.md'}, {out / 'results.json'}, {out / 'curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
