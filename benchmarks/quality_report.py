"""Aggregation, table and curves of ``make bench-quality`` (the runner is ``benchmarks/quality.py``).

Input: one record per finished run, ``{"method", "seed", "wall_s", "steps", "evals": [{"step",
"probe_fd", "probe_acc"}, ...]}``. Output: per method and eval step the mean and (sample) standard
deviation over seeds, a Markdown table, a PNG of the curves and the paired differences against a
baseline method (same seed = same initialisation, data order and evaluation noise).
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

METRICS = ("probe_fd", "probe_acc")
LOWER_IS_BETTER = {"probe_fd": True, "probe_acc": False}


def read_evals(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The online-evaluation rows of a ``metrics.jsonl`` (records holding ``probe_fd``), by step."""
    rows = [{"step": int(r["step"]), **{m: float(r[m]) for m in METRICS if m in r}}
            for r in records if "probe_fd" in r]
    return sorted(rows, key=lambda r: r["step"])


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(runs: list[dict[str, Any]], methods: list[str] | None = None) -> dict[str, Any]:
    """``{method: {"seeds": [...], "wall_s": (mean, std), "curve": {metric: [(step, mean, std, n)]},
    "final": {metric: (mean, std)}}}`` over the runs given (finished or not: a curve point averages the
    seeds that reached it; ``final`` uses each run's last evaluation)."""
    by_method: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        by_method[run["method"]].append(run)
    order = [m for m in (methods or sorted(by_method)) if m in by_method]
    out: dict[str, Any] = {}
    for method in order:
        group = sorted(by_method[method], key=lambda r: r["seed"])
        curve: dict[str, list[tuple[int, float, float, int]]] = {}
        final: dict[str, tuple[float, float]] = {}
        for metric in METRICS:
            per_step: dict[int, list[float]] = defaultdict(list)
            for run in group:
                for e in run["evals"]:
                    if metric in e:
                        per_step[e["step"]].append(e[metric])
            curve[metric] = [(s, *mean_std(v), len(v)) for s, v in sorted(per_step.items())]
            # The last evaluation step any seed reached, over the seeds that reached it (never a mix of steps).
            final[metric] = mean_std(per_step[max(per_step)]) if per_step else (math.nan, math.nan)
        walls = [r["wall_s"] for r in group if r.get("wall_s")]
        speeds = [r["s_per_step"] for r in group if r.get("s_per_step")]
        last = curve["probe_fd"][-1] if curve["probe_fd"] else (0, math.nan, math.nan, 0)
        out[method] = {"seeds": [r["seed"] for r in group], "curve": curve, "final": final,
                       "final_step": last[0], "final_n": last[3],
                       "wall_s": mean_std(walls), "s_per_step": mean_std(speeds),
                       "steps": max((r.get("steps", 0) for r in group), default=0)}
    return out


def paired_differences(runs: list[dict[str, Any]], baseline: str) -> dict[str, dict[str, tuple[float, float, int]]]:
    """Per method: mean ± std over seeds of (method − baseline), same seed against same seed, at the
    latest evaluation step that at least one such pair has both evaluated (only pairs at that step
    count), for each metric, with the number of pairs."""
    index = {(r["method"], r["seed"]): {e["step"]: e for e in r["evals"]} for r in runs}
    out: dict[str, dict[str, tuple[float, float, int]]] = {}
    for method in sorted({m for m, _ in index} - {baseline}):
        pairs = [(index[(method, seed)], index[(baseline, seed)]) for m, seed in sorted(index)
                 if m == method and (baseline, seed) in index]
        steps = [st for ours, base in pairs for st in ours if st in base]
        if not steps:
            continue
        step = max(steps)
        pairs = [(ours[step], base[step]) for ours, base in pairs if step in ours and step in base]
        out[method] = {}
        for metric in METRICS:
            diffs = [o[metric] - b[metric] for o, b in pairs]
            out[method][metric] = (*mean_std(diffs), len(diffs))
    return out


def _fmt(ms: tuple[float, float], digits: int) -> str:
    mean, std = ms
    return "–" if math.isnan(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(summary: dict[str, Any], diffs: dict[str, Any] | None = None, baseline: str = "",
                   labels: dict[str, str] | None = None) -> str:
    """A Markdown table: final probe-FD and accuracy (mean ± std over seeds), training time per step (the
    median over each run's log windows, then mean ± std over runs), and the per-step curves below it."""
    labels = labels or {}
    lines = ["| method | seeds | step | probe-FD ↓ (final) | probe-acc ↑ (final) | "
             f"Δ FD vs {baseline or 'baseline'} | Δ acc | train s / step |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for method, s in summary.items():
        d = (diffs or {}).get(method, {})
        dfd = _fmt(d["probe_fd"][:2], 1) if "probe_fd" in d else "–"
        dacc = _fmt(d["probe_acc"][:2], 3) if "probe_acc" in d else "–"
        lines.append(f"| {labels.get(method, method)} | {s['final_n']} | {s['final_step']} | "
                     f"{_fmt(s['final']['probe_fd'], 1)} | {_fmt(s['final']['probe_acc'], 3)} | {dfd} | {dacc} | "
                     f"{_fmt(s.get('s_per_step', (math.nan, math.nan)), 3)} |")
    steps = sorted({p[0] for s in summary.values() for p in s["curve"]["probe_fd"]})
    if steps:
        lines += ["", "probe-FD / probe-acc at each evaluation (mean over seeds):", "",
                  "| method | " + " | ".join(f"step {st}" for st in steps) + " |",
                  "|---|" + "---:|" * len(steps)]
        for method, s in summary.items():
            fd = {p[0]: p[1] for p in s["curve"]["probe_fd"]}
            acc = {p[0]: p[1] for p in s["curve"]["probe_acc"]}
            cells = [f"{fd[st]:.0f} / {acc[st]:.2f}" if st in fd and st in acc else "–" for st in steps]
            lines.append(f"| {labels.get(method, method)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(summary: dict[str, Any], out: str | Path, labels: dict[str, str] | None = None,
                title: str = "") -> Path:
    """Probe-FD and probe-accuracy over training steps: mean over seeds, ± std shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = labels or {}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric in zip(axes, METRICS):
        for method, s in summary.items():
            pts = s["curve"][metric]
            if not pts:
                continue
            steps = [p[0] for p in pts]
            mean = [p[1] for p in pts]
            std = [p[2] for p in pts]
            line, = ax.plot(steps, mean, marker="o", ms=3, lw=1.8,
                            label=f"{labels.get(method, method)} (n={len(s['seeds'])})")
            ax.fill_between(steps, [m - d for m, d in zip(mean, std)], [m + d for m, d in zip(mean, std)],
                            color=line.get_color(), alpha=0.15)
        ax.set_xlabel("training step")
        ax.set_title("probe-FD (lower is better)" if metric == "probe_fd"
                      else "conditional probe accuracy (higher is better)")
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[1].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
