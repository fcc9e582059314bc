"""Dataset statistics merged from the shard writer's per-shard reports."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .data_facts import data_fact


def latent_stats(out_dir: str | Path) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of every latent in a shard directory (from the shards' reports; recorded with
    the run, so a trained model decodes with the statistics it was trained on, also without the shards)."""
    mean, std = data_fact(f"{Path(out_dir)}/*.json:latent_stats", lambda: list(_merged_stats(out_dir)))
    return mean, std


def _merged_stats(out_dir: str | Path) -> tuple[list[float], list[float]]:
    total = None
    for report in sorted(Path(out_dir).glob("*.json")):
        data = json.loads(report.read_text())
        stats = data.get("stats") if isinstance(data, dict) else None  # codec.json, classes.json: none
        if stats:
            part = torch.tensor([stats["count"], stats["sum"], stats["sumsq"]], dtype=torch.float64)
            total = part if total is None else total + part
    if total is None:
        raise FileNotFoundError(f"no shard reports with latent statistics in {out_dir}")
    mean = total[1] / total[0]
    std = (total[2] / total[0] - mean**2).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.tolist()
