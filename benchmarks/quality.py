"""``make bench-quality``: what Self-Flow buys over flow matching and REPA, at toy scale, with intervals.

Methods: vanilla flow matching, REPA (the toy encoder: ``data.options.repa_encoder: toy``), Self-Flow and its
two ablations (no masking, no representation loss). Datasets: the embedded digits (configs/tiny/digits.yaml)
and synthetic shapes (configs/tiny/image.yaml). Every run is the tiny MMDiT at equal optimizer steps and batch;
seed k gives every method the same initial backbone (a projector is drawn apart since session 24), and every
seed and method the same data order (``data.options.data_seed``) and evaluation noise, so differences are paired.

Every ``steps // evals`` steps and at the last step (``--evals`` 6 of 1,000 steps: 166 … 996 and 1,000) the trainer's online evaluator samples ``--eval-samples`` images from the
EMA model with the same sampler and the same noise for every method (:data:`SAMPLER`, seed ``sample.seed + 1``)
and scores the dataset's probe-FD and conditional accuracy; after training, ``selfflow eval linear-probe``
measures each block's linear-probe accuracy (t = 0, 0.25, 0.5). Then: per method the mean with a 95 % interval
over seeds, the paired difference to flow matching with its interval, linear-probe accuracy per block and the
convergence speed-up at equal steps and equal wall-clock (benchmarks/quality_report.py).

Resumable: each (dataset, method, seed) writes ``OUT/results/<dataset>-<method>-s<seed>.json`` atomically when
it finishes and a rerun skips it (an interrupted run resumes from its last checkpoint). Output:
``OUT/table.md``, ``OUT/curves.png``, ``OUT/results.json``.

Presets (``--quick``, ``--smoke``; any size flag overrides): see :data:`PRESETS`; their cost is estimated in
:func:`estimate_core_s` from per-step times measured single-threaded (``time.process_time``).

Usage: python benchmarks/quality.py [--quick | --smoke] [--jobs 2] [--datasets digits shapes]
       [--methods ...] [--seeds 0 1 2 3 4] [--steps N] [--report-only]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

METHODS: dict[str, list[str]] = {  # method → its config overrides
    "flow_matching": ["objective.kind=flow_matching"],
    "repa": ["objective.kind=repa", "data.options.repa_encoder=toy"],
    "self_flow": ["objective.kind=self_flow"],
    "self_flow_no_mask": ["objective.kind=self_flow_no_mask"],
    "self_flow_no_rep": ["objective.kind=self_flow_no_rep"],
}
LABELS = {"flow_matching": "flow matching", "repa": "REPA (toy encoder)", "self_flow": "Self-Flow",
          "self_flow_no_mask": "Self-Flow w/o masking", "self_flow_no_rep": "Self-Flow w/o rep. loss"}
DATASETS = {"digits": "configs/tiny/digits.yaml", "shapes": "configs/tiny/image.yaml"}
BASELINE = "flow_matching"
# One sampler for every method and evaluation: Euler, 8 steps, no guidance (one forward per step: the
# 2,000-sample final FD is the study's largest cost); the noise is fixed by the evaluation's seed.
SAMPLER_STEPS, CFG = 8, 1.0
SAMPLER = ["sample.solver=euler", f"sample.steps={SAMPLER_STEPS}", f"sample.cfg_scale={CFG}", "sample.every=0",
           "sample.num_samples=20"]
FINAL_SEED = 0  # the final evaluation's noise, the same for every method and seed
LP_LEVELS = ["0", "0.25", "0.5"]

PRESETS: dict[str, dict[str, Any]] = {
    "full": {"datasets": ["digits"], "methods": ["flow_matching", "self_flow"], "seeds": [0, 1, 2, 3, 4],
             "steps": 1000, "batch_size": 16, "evals": 6, "eval_samples": 400, "final_samples": 2000,
             "lp_fit": 1000, "lp_test": 297, "model": [], "out": "runs/bench-quality"},
    "quick": {"datasets": ["digits"], "methods": ["flow_matching", "self_flow"], "seeds": [0, 1, 2, 3, 4],
              "steps": 120, "batch_size": 16, "evals": 6, "eval_samples": 100, "final_samples": 400,
              "lp_fit": 300, "lp_test": 297, "model": [], "out": "runs/bench-quality-quick"},
    "smoke": {"datasets": ["digits"], "methods": ["flow_matching", "repa", "self_flow"], "seeds": [0, 1],
              "steps": 4, "batch_size": 4, "evals": 2, "eval_samples": 16, "final_samples": 24, "lp_fit": 40,
              "lp_test": 20, "model": ["model.depth_double=1", "model.depth_single=1"],
              "out": "runs/bench-quality-smoke"},
}
# Single-threaded CPU seconds (time.process_time, tiny MMDiT, 64 tokens, on a loaded 2-core machine: an upper
# bound) per training step at batch 16, per model forward of one sample when generating, per linear-probe image.
COST = {"step": {"flow_matching": 0.38, "repa": 0.33, "self_flow": 0.39, "self_flow_no_mask": 0.39,
                 "self_flow_no_rep": 0.38}, "forward": 0.007, "probe_image": 0.025}


def estimate_core_s(s: dict[str, Any]) -> float:
    """Single-core CPU seconds the settings ``s`` need (training, evaluations, final FD, linear probes)."""
    forwards = SAMPLER_STEPS * (2 if CFG != 1 else 1) * (s["evals"] * s["eval_samples"] + s["final_samples"])
    per_run = COST["forward"] * forwards + COST["probe_image"] * (s["lp_fit"] + s["lp_test"])
    per_seed = sum(COST["step"][m] * s["steps"] * s["batch_size"] / 16 + per_run for m in s["methods"])
    return per_seed * len(s["seeds"]) * len(s["datasets"])


def run_key(dataset: str, method: str, seed: int) -> str:
    return f"{dataset}-{method}-s{seed}"


def settings_id(s: dict[str, Any]) -> str:
    """What a finished result depends on: a result written under other settings is not reused."""
    keys = ("steps", "batch_size", "evals", "eval_samples", "final_samples", "lp_fit", "lp_test", "model")
    return hashlib.sha1(json.dumps([s[k] for k in keys] + [SAMPLER, LP_LEVELS]).encode()).hexdigest()[:12]


def train_args(dataset: str, method: str, seed: int, s: dict[str, Any], runs_dir: Path, threads: int) -> list[str]:
    every = max(1, s["steps"] // s["evals"])
    sets = [f"name={run_key(dataset, method, seed)}", f"output_dir={runs_dir}", *METHODS[method],
            f"train.seed={seed}", f"train.steps={s['steps']}", f"train.batch_size={s['batch_size']}",
            f"eval.every={every}", f"eval.num_samples={s['eval_samples']}", f"checkpoint.every={every}",
            "checkpoint.keep_last=1", f"logging.plot_every={s['steps']}", f"train.num_threads={threads}",
            *SAMPLER, *s["model"]]
    return ["train", "--config", str(ROOT / DATASETS[dataset]), "--no-progress",
            *[a for kv in sets for a in ("--set", kv)]]


def probe_args(run_dir: Path, s: dict[str, Any]) -> list[str]:
    return ["eval", "linear-probe", "--run", str(run_dir), "--num-fit", str(s["lp_fit"]), "--num-test",
            str(s["lp_test"]), "--levels", *LP_LEVELS, "--device", "cpu"]


def final_args(run_dir: Path, s: dict[str, Any]) -> list[str]:
    return ["eval", "probe", "--run", str(run_dir), "--num", str(s["final_samples"]), "--seed", str(FINAL_SEED),
            "--steps", str(SAMPLER_STEPS), "--cfg-scale", str(CFG), "--device", "cpu",
            "--out", str(run_dir / "final_probe.json")]


def _selfflow(args: list[str], log: Path, threads: int, in_process: bool) -> int:
    """``selfflow ARGS``: a subprocess with ``threads`` threads (its output appended to ``log``), or this process."""
    if in_process:
        from selfflow.core.cli import main

        return main(args)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    with open(log, "a") as f:
        return subprocess.run([sys.executable, "-m", "selfflow.core.cli", *args], stdout=f, stderr=subprocess.STDOUT,
                              env=env, cwd=ROOT).returncode


def read_run(run_dir: Path) -> dict[str, Any]:
    """Evaluations, training seconds per step and linear-probe result of a finished run directory."""
    from benchmarks.quality_report import read_evals
    from selfflow.core.metrics import read_metrics

    records = read_metrics(run_dir / "metrics.jsonl")
    rates = sorted(r["samples_per_s"] for r in records if r.get("samples_per_s"))
    batch = json.loads((run_dir / "bench_batch.json").read_text())["batch_size"]
    lp = run_dir / "linear_probe.json"
    final = json.loads((run_dir / "final_probe.json").read_text())
    return {"evals": read_evals(records), "steps": max(r["step"] for r in records),
            "final": {k: final[k] for k in ("probe_fd", "probe_acc", "num_samples")},
            # the median over log windows: training only, not evaluation
            "s_per_step": batch / rates[len(rates) // 2] if rates else None,
            "linear_probe": json.loads(lp.read_text()) if lp.is_file() else None}


def run_one(dataset: str, method: str, seed: int, s: dict[str, Any], out: Path, threads: int,
            in_process: bool = False) -> str:
    from selfflow.core.atomic import atomic_write_text

    key = run_key(dataset, method, seed)
    result = out / "results" / f"{key}.json"
    if result.is_file() and json.loads(result.read_text()).get("settings") == settings_id(s):
        return f"{key}: finished earlier, skipped"
    runs_dir = out / "runs"
    run_dir, log = runs_dir / key, runs_dir / f"{key}.log"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "bench_batch.json").write_text(json.dumps({"batch_size": s["batch_size"]}))
    t0 = time.perf_counter()
    if _selfflow(train_args(dataset, method, seed, s, runs_dir, threads), log, threads, in_process) != 0:
        return f"{key}: training FAILED (see {log})"
    wall = time.perf_counter() - t0
    if _selfflow(final_args(run_dir, s), log, threads, in_process) != 0:
        return f"{key}: final evaluation FAILED (see {log})"
    if _selfflow(probe_args(run_dir, s), log, threads, in_process) != 0:
        return f"{key}: linear probe FAILED (see {log})"
    record = {"dataset": dataset, "method": method, "seed": seed, "settings": settings_id(s), "wall_s": wall,
              **read_run(run_dir)}
    atomic_write_text(result, json.dumps(record, indent=1))
    return f"{key}: done in {wall / 60:.1f} min"


def prepare(s: dict[str, Any]) -> None:
    """Train (or load) each dataset's evaluation probe and, for REPA, its toy encoder once, into the cache,
    before parallel runs would each train them."""
    import yaml

    from selfflow.core.registry import get_evaluator
    from selfflow.image.modality import ImageModality

    for dataset in s["datasets"]:
        options = yaml.safe_load((ROOT / DATASETS[dataset]).read_text())["data"]["options"]
        modality = ImageModality({**options, **({"repa_encoder": "toy"} if "repa" in s["methods"] else {})})
        get_evaluator(modality.evaluator)(modality)


def report(s: dict[str, Any], out: Path, wall_total: float | None = None) -> str:
    from benchmarks.quality_report import (
        aggregate,
        markdown_table,
        paired_differences,
        plot_curves,
        speedups,
    )
    from selfflow.core.atomic import atomic_write_text

    runs = [json.loads(p.read_text()) for p in sorted((out / "results").glob("*.json"))]
    runs = [r for r in runs if r.get("settings") == settings_id(s) and r["dataset"] in s["datasets"]
            and r["method"] in s["methods"]]
    if not runs:
        return "no finished runs yet"
    text, summaries, per_dataset = [], {}, {}
    for dataset in s["datasets"]:
        group = [r for r in runs if r["dataset"] == dataset]
        if not group:
            continue
        summary = aggregate(group, s["methods"])
        diffs, speed = paired_differences(group, BASELINE), speedups(group, BASELINE)
        summaries[dataset] = summary
        per_dataset[dataset] = {"summary": summary, "paired_vs_flow_matching": diffs, "speedup": speed}
        text.append(f"### {dataset}\n\nprobe-FD and probe-acc: the final evaluation ({s['final_samples']} samples); "
                    f"speed-ups: the {s['evals']} online evaluations ({s['eval_samples']} samples); "
                    "mean [95 % CI] over seeds\n\n" + markdown_table(summary, diffs, speed, BASELINE, LABELS))
    title = (f"tiny MMDiT, {s['steps']} steps × batch {s['batch_size']}, {len(s['seeds'])} seeds, "
             f"{s['eval_samples']} samples per evaluation")
    plot_curves(summaries, out / "curves.png", LABELS, title)
    table = "\n".join(text)
    atomic_write_text(out / "table.md", table)
    meta = {"machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "settings": s, "sampler": SAMPLER, "lp_levels": LP_LEVELS,
            "wall_total_s": wall_total, "estimated_core_s": estimate_core_s(s)}
    import torch

    meta["torch"] = torch.__version__
    atomic_write_text(out / "results.json", json.dumps({"meta": meta, "datasets": per_dataset, "runs": runs},
                                                        indent=1))
    return table


def settings(args: argparse.Namespace) -> dict[str, Any]:
    s = dict(PRESETS["smoke" if args.smoke else "quick" if args.quick else "full"])
    for key in ("datasets", "methods", "seeds", "steps", "batch_size", "evals", "eval_samples", "final_samples",
                "out"):
        if getattr(args, key) is not None:
            s[key] = getattr(args, key)
    if BASELINE not in s["methods"]:
        raise SystemExit(f"--methods must include {BASELINE} (the baseline of the paired differences)")
    if s["evals"] < 1 or s["steps"] < s["evals"]:
        raise SystemExit(f"need 1 ≤ --evals ≤ --steps, got {s['evals']} evaluations in {s['steps']} steps")
    s["out"] = str(s["out"])
    return s


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="~10 min: FM vs Self-Flow on digits, 400-sample FD")
    mode.add_argument("--smoke", action="store_true", help="< 60 s, in this process: checks the pipeline only")
    ap.add_argument("--datasets", nargs="+", choices=sorted(DATASETS))
    ap.add_argument("--methods", nargs="+", choices=list(METHODS))
    ap.add_argument("--seeds", type=int, nargs="+")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--evals", type=int, help="evaluations every steps // evals steps, plus one at the last step")
    ap.add_argument("--eval-samples", type=int, help="generated samples per evaluation during training")
    ap.add_argument("--final-samples", type=int, help="generated samples of the final FD (the table's)")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                    help="runs in parallel (default 2), each with cpus // jobs threads")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--report-only", action="store_true", help="only aggregate the finished runs")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    s = settings(args)
    out = Path(s["out"]) if Path(s["out"]).is_absolute() else ROOT / s["out"]
    out.mkdir(parents=True, exist_ok=True)
    wall_total = None
    if not args.report_only:
        jobs = [(d, m, seed) for d in s["datasets"] for seed in s["seeds"] for m in s["methods"]]  # seed-major
        threads = max(1, (os.cpu_count() or 1) // max(1, args.jobs))
        in_process = args.smoke
        print(f"bench-quality: {len(jobs)} runs of {s['steps']} steps × batch {s['batch_size']}, "
              f"{s['evals']} evaluations of {s['eval_samples']} samples; estimated "
              f"{estimate_core_s(s) / 60:.0f} core-minutes → {out}", flush=True)
        t0 = time.perf_counter()
        prepare(s)
        with ThreadPoolExecutor(1 if in_process else max(1, args.jobs)) as pool:
            futures = [pool.submit(run_one, d, m, seed, s, out, threads, in_process) for d, m, seed in jobs]
            for future in as_completed(futures):
                print(f"  [{(time.perf_counter() - t0) / 60:5.1f} min] {future.result()}", flush=True)
        wall_total = time.perf_counter() - t0
    print(report(s, out, wall_total))
    print(f"wrote {out / 'table.md'}, {out / 'results.json'}, {out / 'curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
