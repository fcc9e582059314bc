"""Run logging: ``metrics.jsonl`` (one JSON object per logged step), TensorBoard events (scalars and sample
media), loss plots."""

from __future__ import annotations

import json
import logging
import math
import wave
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_path, atomic_write_text

log = logging.getLogger("selfflow.metrics")


class MetricsLogger:
    """Appends step records to ``metrics.jsonl`` and mirrors scalars and sample media to TensorBoard.

    On resume, records after the resumed step are dropped first (an atomic rewrite: a kill leaves the old
    file or the new one, never a truncated one), so the file reads as one clean run.
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
            if step:
                log.warning("%s is missing: the metrics of steps 1-%d are lost; logging continues from step %d",
                            self.path, step, step + 1)
            return
        records = read_metrics(self.path)
        if step and not records:
            log.warning("%s is empty: the metrics of steps 1-%d are lost; logging continues from step %d",
                        self.path, step, step + 1)
        kept = [r for r in records if r.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def log(self, record: dict[str, Any], scalars: dict[str, float] | None = None) -> None:
        """Append ``record``; TensorBoard gets ``scalars`` (tag → value; default: the record's finite numbers)."""
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for tag, v in (scalar_values(record) if scalars is None else scalars).items():
                self._tb.add_scalar(tag, v, record["step"])

    def log_media(self, step: int, tag: str, path: str | Path) -> None:
        """A written sample file in TensorBoard: a PNG as an image, a WAV as audio, an MP4/GIF clip as a video
        (needs moviepy) or else as a strip of its frames."""
        if self._tb is None:
            return
        path = Path(path)
        if path.suffix == ".png":
            self._tb.add_image(tag, read_png(path), step, dataformats="HWC")
        elif path.suffix == ".wav":
            samples, rate = read_wav(path)
            self._tb.add_audio(tag, samples.mean(0, keepdims=True), step, sample_rate=rate)
        elif path.suffix in (".mp4", ".gif"):
            frames = read_gif(path.with_suffix(".gif"))  # (T, H, W, 3); the GIF is written beside the MP4
            try:
                import moviepy  # noqa: F401 - add_video encodes with it
            except ImportError:
                self._tb.add_image(tag, frame_strip(frames), step, dataformats="HWC")
            else:
                import torch

                clip = torch.from_numpy(frames).permute(0, 3, 1, 2)[None]  # (1, T, 3, H, W)
                self._tb.add_video(tag, clip, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def scalar_values(record: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a record except its step (what TensorBoard and W&B plot)."""
    return {k: v for k, v in record.items()
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``; a line that is not JSON (the torn last line of a killed run) is
    dropped with a warning naming the file and line."""
    out = []
    for number, line in enumerate(Path(path).read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            log.warning("%s line %d is not a JSON record (a write cut short?); dropped: %.80s", path, number, line)
            continue
        out.append(record)
    return out


def read_png(path: Path) -> np.ndarray:
    """RGB uint8 ``(H, W, 3)``."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """A 16-bit PCM WAV (what the audio writer produces) as float ``(C, N)`` in [-1, 1] and its sample rate."""
    with wave.open(str(path), "rb") as w:
        channels, rate = w.getnchannels(), w.getframerate()
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    return pcm.reshape(-1, channels).T.astype(np.float32) / 32768.0, rate


def read_gif(path: Path) -> np.ndarray:
    """The frames of a GIF as RGB uint8 ``(T, H, W, 3)``."""
    from PIL import Image, ImageSequence

    with Image.open(path) as im:
        return np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)])


def frame_strip(frames: np.ndarray, max_frames: int = 8) -> np.ndarray:
    """Up to ``max_frames`` evenly spaced frames of ``(T, H, W, 3)`` side by side: ``(H, k·W, 3)``."""
    keep = np.unique(np.linspace(0, len(frames) - 1, min(max_frames, len(frames))).round().astype(int))
    return np.concatenate(list(frames[keep]), axis=1)


def plot_losses(metrics_path: str | Path, out_path: str | Path, keys: tuple[str, ...] | None = None) -> Path:
    """Loss curves (raw and smoothed) from ``metrics.jsonl`` as a PNG, one panel per key present; by default
    ``loss``, ``loss_fm``, ``loss_rep`` and the token groups' ``loss_fm_<group>`` (a token schedule's: rt1's
    future video and actions)."""
    records = read_metrics(metrics_path)
    if keys is None:
        grouped = sorted({k for r in records for k in r if k.startswith("loss_fm_")})
        keys = ("loss", "loss_fm", "loss_rep", *grouped)
    keys = tuple(k for k in keys if any(k in r for r in records))
    # One curve per modality in mixed runs (records name their modality), else raw + smoothed.
    groups = sorted({r["modality"] for r in records if "modality" in r})
    plt, fig, axes = _panels(len(keys))
    for ax, key in zip(axes, keys):
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
    axes[0].legend()
    return _save(plt, fig, out_path)


SCORE_PANELS = 8


def plot_scores(metrics_path: str | Path, out_path: str | Path) -> Path | None:
    """The online evaluation's scores over training (the records of ``metrics.jsonl`` without a loss) as a PNG,
    one panel per score, the first :data:`SCORE_PANELS` logged; the linear probe's per-block grid
    (``lp_acc/…``) stays in ``metrics.jsonl`` (its ``lp_acc_best`` is plotted). ``None`` without scores."""
    records = [r for r in read_metrics(metrics_path) if "loss" not in r]
    keys: list[str] = []
    for r in records:
        keys += [k for k, v in r.items() if k != "step" and k not in keys and not k.startswith("lp_acc/")
                 and isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not keys:
        return None
    plt, fig, axes = _panels(min(len(keys), SCORE_PANELS))
    for ax, key in zip(axes, keys):
        pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if pts:
            ax.plot(*zip(*pts), marker="o", lw=1.5)
        ax.set_title(key)
    return _save(plt, fig, out_path)


def _panels(n: int):
    """A row of ``n`` panels (at least one) with a step axis: ``(pyplot, figure, axes)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, max(1, n), figsize=(4.2 * max(1, n), 3.2), squeeze=False)
    for ax in axes[0]:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    return plt, fig, list(axes[0])


def _save(plt, fig, out_path: str | Path) -> Path:
    """Write ``fig`` to ``out_path`` as a PNG, atomically, and close it."""
    fig.tight_layout()
    out = Path(out_path)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return out
