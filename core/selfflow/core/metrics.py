"""Run logging: ``metrics.jsonl`` (one JSON object per logged step), TensorBoard events, loss plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class MetricsLogger:
    """Appends step records to ``metrics.jsonl`` and mirrors scalars to TensorBoard.

    On resume, records after the resumed step are dropped first, so the file reads as one clean run.
    """

    def __init__(self, run_dir: str | Path, resume_step: int = 0, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step)
        self._file = open(self.path, "a")  # noqa: SIM115 - kept open for the run
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=resume_step or None)

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = record["step"]
            for k, v in record.items():
                if k != "step" and isinstance(v, int | float) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_losses(metrics_path: str | Path, out_path: str | Path,
                keys: tuple[str, ...] = ("loss", "loss_fm", "loss_rep")) -> Path:
    """Loss curves (raw and smoothed) from ``metrics.jsonl`` as a PNG, one panel per key present."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    keys = tuple(k for k in keys if any(k in r for r in records))
    # One curve per modality in mixed runs (records name their modality), else raw + smoothed.
    groups = sorted({r["modality"] for r in records if "modality" in r})
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(4.2 * max(1, len(keys)), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for group in groups if len(groups) > 1 else [None]:
            pts = [(r["step"], r[key]) for r in records if key in r and math.isfinite(r[key])
                   and (group is None or r.get("modality") == group)]
            if not pts:
                continue
            steps, vals = zip(*pts)
            if group is None:
                ax.plot(steps, vals, alpha=0.35, lw=1, label="raw")
            ema, smooth = vals[0], []
            for v in vals:
                ema = 0.9 * ema + 0.1 * v
                smooth.append(ema)
            ax.plot(steps, smooth, lw=2, label="smoothed" if group is None else group)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    out = Path(out_path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
