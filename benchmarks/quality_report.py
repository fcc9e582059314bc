"""Aggregation, tables and curves of ``make bench-quality`` (the runner is ``benchmarks/quality.py``).

Input: one record per run, ``{"dataset", "method", "seed", "steps", "s_per_step", "evals": [{"step",
"probe_fd", "probe_acc"}, ...], "final": {"probe_fd", "probe_acc"} (a larger last evaluation, optional),
"linear_probe": {"accuracy": {block: {t: acc}}} | None}``; the table's final numbers are ``final``'s. Per dataset and
method: the mean over seeds with its 95 % Student-t interval at every evaluation; the paired difference to
the baseline (same seed = same initial backbone; data order and evaluation noise shared by all) with its interval at the last
step both reached; linear-probe accuracy per block; the convergence speed-up over the baseline per seed
(:func:`.quality_stats.speedup`), at equal steps and at equal wall-clock.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from benchmarks.quality_stats import paired_difference, speedup, t_interval

METRICS = ("probe_fd", "probe_acc")
LOWER_IS_BETTER = {"probe_fd": True, "probe_acc": False, "lp_acc_best": False}


def read_evals(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The online-evaluation rows of a ``metrics.jsonl`` (records holding ``probe_fd``), by step."""
    rows = [{"step": int(r["step"]), **{m: float(r[m]) for m in METRICS if m in r}}
            for r in records if "probe_fd" in r]
    return sorted(rows, key=lambda r: r["step"])


def lp_best(run: dict[str, Any]) -> float:
    """The run's best linear-probe accuracy over blocks and noise levels (NaN without a probe)."""
    lp = run.get("linear_probe")
    if not lp:
        return math.nan
    return max(v for row in lp["accuracy"].values() for v in row.values())


def _final(run: dict[str, Any], metric: str, step: int) -> float | None:
    return next((e[metric] for e in run["evals"] if e["step"] == step and metric in e), None)


def aggregate(runs: list[dict[str, Any]], methods: list[str]) -> dict[str, Any]:
    """``{method: {"seeds", "curve": {metric: [(step, mean, low, high, n)]}, "final": {metric: (mean, low,
    high, n)}, "s_per_step": (mean, low, high), "lp": {block: {t: (mean, low, high)}}, "lp_best": (…)}}``
    over the runs of one dataset (a curve point averages the seeds that reached it; ``final`` is the last
    step any seed reached, over the seeds that reached it)."""
    by_method: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        by_method[run["method"]].append(run)
    out: dict[str, Any] = {}
    for method in [m for m in methods if m in by_method]:
        group = sorted(by_method[method], key=lambda r: r["seed"])
        curve, final = {}, {}
        for metric in METRICS:
            per_step: dict[int, list[float]] = defaultdict(list)
            for run in group:
                for e in run["evals"]:
                    if metric in e:
                        per_step[e["step"]].append(e[metric])
            curve[metric] = [(s, *t_interval(v), len(v)) for s, v in sorted(per_step.items())]
            if all(r.get("final") for r in group):  # the separate, larger final evaluation
                values = [r["final"][metric] for r in group]
                final[metric] = (*t_interval(values), len(values))
            else:
                final[metric] = curve[metric][-1][1:] if curve[metric] else (math.nan, math.nan, math.nan, 0)
        values: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for run in group:
            for block, row in (run.get("linear_probe") or {}).get("accuracy", {}).items():
                for t, v in row.items():
                    values[block][t].append(v)
        lp = {block: {t: t_interval(v) for t, v in row.items()} for block, row in values.items()}
        out[method] = {"seeds": [r["seed"] for r in group], "curve": curve, "final": final,
                       "s_per_step": t_interval([r["s_per_step"] for r in group if r.get("s_per_step")]),
                       "lp": lp, "lp_best": t_interval([lp_best(r) for r in group])}
    return out


def paired_differences(runs: list[dict[str, Any]], baseline: str) -> dict[str, dict[str, Any]]:
    """Per method: ``{metric: (mean, low, high, n)}`` of (method − baseline) over the seeds both ran, on the
    final evaluation when every run has one, else at the last online-evaluation step such pairs share (only
    pairs evaluated there count); ``lp_acc_best`` likewise."""
    index = {(r["method"], r["seed"]): r for r in runs}
    out: dict[str, dict[str, Any]] = {}
    for method in sorted({m for m, _ in index} - {baseline}):
        seeds = [s for m, s in index if m == method and (baseline, s) in index]
        shared = [st for s in seeds for st in {e["step"] for e in index[(method, s)]["evals"]}
                  & {e["step"] for e in index[(baseline, s)]["evals"]}]
        row: dict[str, Any] = {}
        if seeds and all(index[(m, s)].get("final") for s in seeds for m in (method, baseline)):
            row["step"] = "final"
            for metric in METRICS:
                row[metric] = paired_difference({s: index[(method, s)]["final"][metric] for s in seeds},
                                                {s: index[(baseline, s)]["final"][metric] for s in seeds})
        elif shared:
            step = max(shared)
            row["step"] = step
            for metric in METRICS:
                ours = {s: v for s in seeds if (v := _final(index[(method, s)], metric, step)) is not None}
                base = {s: v for s in seeds if (v := _final(index[(baseline, s)], metric, step)) is not None}
                row[metric] = paired_difference(ours, base)
        row["lp_acc_best"] = paired_difference({s: lp_best(index[(method, s)]) for s in seeds},
                                               {s: lp_best(index[(baseline, s)]) for s in seeds})
        out[method] = row
    return out


def speedups(runs: list[dict[str, Any]], baseline: str, metric: str = "probe_fd") -> dict[str, dict[str, Any]]:
    """Per method: how much sooner the baseline would reach the method's final ``metric``, per seed, then the
    mean and 95 % interval over seeds — ``steps`` (equal steps) and ``wall`` (equal wall-clock, each side's
    steps × its measured seconds per step); ``lower_bounds`` counts seeds where the baseline never got
    there (their ratio is a lower bound)."""
    index = {(r["method"], r["seed"]): r for r in runs}
    out: dict[str, dict[str, Any]] = {}
    for method in sorted({m for m, _ in index} - {baseline}):
        per_seed = []
        for (m, seed), run in sorted(index.items()):
            base = index.get((baseline, seed))
            if m != method or base is None:
                continue
            ours = [(e["step"], e[metric]) for e in run["evals"] if metric in e]
            theirs = [(e["step"], e[metric]) for e in base["evals"] if metric in e]
            if ours and theirs:
                per_seed.append(speedup(theirs, ours, LOWER_IS_BETTER[metric], base.get("s_per_step") or 1.0,
                                        run.get("s_per_step") or 1.0))
        if per_seed:
            out[method] = {"steps": t_interval([p["steps"] for p in per_seed]),
                           "wall": t_interval([p["wall"] for p in per_seed]),
                           "lower_bounds": sum(bool(p["lower_bound"]) for p in per_seed), "n": len(per_seed)}
    return out


def _ci(v: tuple[float, ...], digits: int) -> str:
    mean, low, high = v[:3]
    if math.isnan(mean):
        return "–"
    if math.isnan(low):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def markdown_table(summary: dict[str, Any], diffs: dict[str, Any], speed: dict[str, Any], baseline: str,
                   labels: dict[str, str] | None = None) -> str:
    """Final probe-FD / accuracy / best linear-probe accuracy (mean [95 % CI]), paired differences to the
    baseline [95 % CI], speed-ups, seconds per step; then linear-probe accuracy per block and the curves."""
    labels = labels or {}
    name = labels.get(baseline, baseline)
    lines = [f"| method | n | probe-FD ↓ | probe-acc ↑ | best LP acc ↑ | Δ FD vs {name} | Δ probe-acc | "
             f"Δ LP acc | speed-up (steps) | speed-up (wall) | s / step |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for method, s in summary.items():
        d, sp = diffs.get(method, {}), speed.get(method)
        cells = [_ci(d[m], p) if m in d else "–" for m, p in (("probe_fd", 1), ("probe_acc", 3), ("lp_acc_best", 3))]
        lb = f" ({sp['lower_bounds']}/{sp['n']} ≥)" if sp and sp["lower_bounds"] else ""
        ups = [_ci(sp[k], 2) + lb if sp else "–" for k in ("steps", "wall")]
        lines.append(f"| {labels.get(method, method)} | {s['final']['probe_fd'][3]} | {_ci(s['final']['probe_fd'], 1)} | "
                     f"{_ci(s['final']['probe_acc'], 3)} | {_ci(s['lp_best'], 3)} | {' | '.join(cells)} | "
                     f"{' | '.join(ups)} | {_ci(s['s_per_step'], 3)} |")
    blocks = sorted({b for s in summary.values() for b in s["lp"]}, key=int)
    levels = sorted({t for s in summary.values() for row in s["lp"].values() for t in row}, key=float)
    if blocks:
        lines += ["", "linear-probe accuracy per block (mean over seeds), noise level t = " + ", ".join(levels), "",
                  "| method | " + " | ".join(f"block {b}" for b in blocks) + " |", "|---|" + "---:|" * len(blocks)]
        for method, s in summary.items():
            cells = [" / ".join(f"{s['lp'][b][t][0]:.2f}" if t in s["lp"].get(b, {}) else "–" for t in levels)
                     for b in blocks]
            lines.append(f"| {labels.get(method, method)} | " + " | ".join(cells) + " |")
    steps = sorted({p[0] for s in summary.values() for p in s["curve"]["probe_fd"]})
    if steps:
        lines += ["", "probe-FD / probe-acc at each evaluation (mean over seeds):", "",
                  "| method | " + " | ".join(f"step {st}" for st in steps) + " |", "|---|" + "---:|" * len(steps)]
        for method, s in summary.items():
            fd = {p[0]: p[1] for p in s["curve"]["probe_fd"]}
            acc = {p[0]: p[1] for p in s["curve"]["probe_acc"]}
            cells = [f"{fd[st]:.1f} / {acc[st]:.2f}" if st in fd and st in acc else "–" for st in steps]
            lines.append(f"| {labels.get(method, method)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(summaries: dict[str, dict[str, Any]], out: str | Path, labels: dict[str, str] | None = None,
                title: str = "") -> Path:
    """One row per dataset: probe-FD and probe-accuracy over training steps, mean over seeds with the 95 %
    interval shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = labels or {}
    fig, axes = plt.subplots(len(summaries), 2, figsize=(10, 3.6 * len(summaries)), squeeze=False)
    for row, (dataset, summary) in zip(axes, summaries.items()):
        for ax, metric in zip(row, METRICS):
            for method, s in summary.items():
                pts = s["curve"][metric]
                if not pts:
                    continue
                steps, mean = [p[0] for p in pts], [p[1] for p in pts]
                line, = ax.plot(steps, mean, marker="o", ms=3, lw=1.8,
                                label=f"{labels.get(method, method)} (n={len(s['seeds'])})")
                if all(not math.isnan(p[2]) for p in pts):
                    ax.fill_between(steps, [p[2] for p in pts], [p[3] for p in pts], color=line.get_color(),
                                    alpha=0.15)
            ax.set_xlabel("training step")
            ax.set_title(f"{dataset}: " + ("probe-FD (lower is better)" if metric == "probe_fd"
                                            else "conditional probe accuracy (higher is better)"), fontsize=9)
            ax.grid(alpha=0.3)
        row[1].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
