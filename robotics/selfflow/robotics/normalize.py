"""Action statistics, normalisation to [−1, 1] and gripper conventions.

- Dims 0–5 (translation, rotation): ``bound`` maps ``[q01, q99] → [−1, 1]`` and clips (the pi0 /
  open-pi-zero form); ``gaussian`` is ``(x − mean) / std``.
- Dim 6 (gripper): fractal stores a *relative* command (+1 close, −1 open, 0 no change). ``absolute``
  (default) converts it to an absolute state with Octo's rule (±0.1 thresholds, carry the last event
  forward; before the first event the state opposite to it — an episode whose first event opens started
  closed —, open when there is none) and maps {closed, open} → {−1, +1}: a dense target for flow matching.
  ``relative`` passes the raw command through.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

OPEN, CLOSED = 1.0, -1.0


def gripper_rel_to_abs(rel: np.ndarray, threshold: float = 0.1) -> np.ndarray:
    """Relative commands ``(T,)`` (+1 close, −1 open, 0 none) → absolute state ``(T,)`` in {−1 closed,
    +1 open}: each event holds until the next one; before the first event the gripper is in the state that
    event leaves (Octo's ``rel2abs_gripper_actions``: ``start = −first_event``), open without events."""
    rel = np.asarray(rel, np.float32)
    events = rel[np.abs(rel) > threshold]
    state = OPEN if not len(events) or events[0] > 0 else CLOSED  # first event closes: it was open
    out = np.empty(len(rel), np.float32)
    for i, r in enumerate(rel):
        if r > threshold:
            state = CLOSED
        elif r < -threshold:
            state = OPEN
        out[i] = state
    return out


def gripper_abs_to_rel(absolute: float, previous: float) -> float:
    """One absolute state change → SIMPLER's relative Google-robot command (+1 close, −1 open, 0 hold)."""
    a, p = (OPEN if absolute >= 0 else CLOSED), (OPEN if previous >= 0 else CLOSED)
    return 0.0 if a == p else (1.0 if a == CLOSED else -1.0)


class ActionStats(BaseModel):
    """Per-dim statistics of the kept raw 7-D actions (``stats.json`` beside the shards)."""

    model_config = ConfigDict(extra="forbid")

    count: int
    mean: list[float]
    std: list[float]
    min: list[float]
    max: list[float]
    q01: list[float]
    q99: list[float]

    @classmethod
    def compute(cls, actions: np.ndarray) -> ActionStats:
        """Exact statistics of ``(N, D)`` actions (fractal: 3.8M × 7 float32 ≈ 100 MB fits in memory)."""
        a = np.asarray(actions, np.float64)
        return cls(count=len(a), mean=a.mean(0).tolist(), std=a.std(0).tolist(), min=a.min(0).tolist(),
                   max=a.max(0).tolist(), q01=np.quantile(a, 0.01, axis=0).tolist(),
                   q99=np.quantile(a, 0.99, axis=0).tolist())

    @classmethod
    def load(cls, path: str | Path) -> ActionStats:
        return cls.model_validate(json.loads(Path(path).read_text()))


class ActionNormalizer:
    """Raw ``(…, 7)`` actions ↔ normalised ``(…, 7)`` in [−1, 1] (dims 0–5 by ``mode``, dim 6 by
    ``gripper``). :meth:`normalize` expects the gripper already absolute in ``absolute`` mode."""

    def __init__(self, stats: ActionStats, mode: Literal["bound", "gaussian"] = "bound",
                 gripper: Literal["absolute", "relative"] = "absolute"):
        self.mode, self.gripper = mode, gripper
        self.lo, self.hi = np.asarray(stats.q01[:6], np.float32), np.asarray(stats.q99[:6], np.float32)
        self.mean, self.std = np.asarray(stats.mean[:6], np.float32), np.asarray(stats.std[:6], np.float32)

    def normalize(self, raw: np.ndarray) -> np.ndarray:
        raw = np.asarray(raw, np.float32)
        arm = raw[..., :6]
        if self.mode == "bound":
            arm = np.clip(2 * (arm - self.lo) / np.maximum(self.hi - self.lo, 1e-8) - 1, -1, 1)
        else:
            arm = (arm - self.mean) / np.maximum(self.std, 1e-8)
        return np.concatenate([arm, np.clip(raw[..., 6:7], -1, 1)], -1).astype(np.float32)

    def denormalize(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float32)
        arm = x[..., :6]
        if self.mode == "bound":
            arm = (np.clip(arm, -1, 1) + 1) / 2 * (self.hi - self.lo) + self.lo
        else:
            arm = arm * self.std + self.mean
        return np.concatenate([arm, np.clip(x[..., 6:7], -1, 1)], -1).astype(np.float32)

    def clip(self, x: torch.Tensor) -> torch.Tensor:
        """A sampled normalised ``(…, 7)`` chunk clipped to where training targets lie: all of [−1, 1] in
        ``bound`` mode; in ``gaussian`` mode the gripper only (arm z-scores beyond ±1 are ordinary motions)."""
        if self.mode == "bound":
            return x.clamp(-1, 1)
        return torch.cat([x[..., :6], x[..., 6:].clamp(-1, 1)], -1)

    def training_target(self, raw_episode: np.ndarray) -> np.ndarray:
        """A whole episode's raw ``(T, 7)`` actions → normalised targets (gripper made absolute first)."""
        raw = np.array(raw_episode, np.float32)
        if self.gripper == "absolute":
            raw[:, 6] = gripper_rel_to_abs(raw[:, 6])
        return self.normalize(raw)


def rpy_to_axis_angle(rpy: np.ndarray) -> np.ndarray:
    """Roll-pitch-yaw (static xyz, R = Rz·Ry·Rx) → axis-angle vector (Octo's convention for rotation deltas)."""
    r, p, y = (float(v) for v in rpy)
    cr, sr, cp, sp, cy, sy = np.cos(r), np.sin(r), np.cos(p), np.sin(p), np.cos(y), np.sin(y)
    m = np.array([[cy * cp, cy * sp * sr - sy * cr, cy * sp * cr + sy * sr],
                  [sy * cp, sy * sp * sr + cy * cr, sy * sp * cr - cy * sr],
                  [-sp, cp * sr, cp * cr]])
    angle = np.arccos(np.clip((np.trace(m) - 1) / 2, -1, 1))
    if angle < 1e-12:
        return np.zeros(3)
    axis = np.array([m[2, 1] - m[1, 2], m[0, 2] - m[2, 0], m[1, 0] - m[0, 1]]) / (2 * np.sin(angle))
    return axis * angle
