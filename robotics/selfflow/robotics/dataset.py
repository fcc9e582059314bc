"""Training windows cut on the fly from episode shards (written by ``selfflow prepare rt1``).

A window starting at step ``s`` holds ``frames`` images ``s … s+frames−1`` (frame 0 is the current
observation, the rest the future) and the action chunk ``s … s+chunk−1``. Near the episode end, frames
repeat the last image and actions are padded with zero motion plus the last gripper state; ``action_mask``
marks the real ones. The start is drawn from ``(seed, epoch, key)``, so a resumed stream cuts the same
windows.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from selfflow.core.data.image_file import decode_rgb
from selfflow.core.data.shard_format import npy_load
from selfflow.core.data.shard_stream import ShardStream

from .normalize import ActionNormalizer


def decode_episode(raw: dict[str, Any]) -> dict[str, Any]:
    """Tar members of one episode → ``key``, ``jpegs`` (list of bytes), ``actions (T, 7)``, ``instruction``,
    ``meta``; raises on a corrupt sample."""
    names = sorted(k for k in raw if k.startswith("f") and k.endswith(".jpg"))
    actions = npy_load(raw["actions.npy"]).astype(np.float32)
    if not names or len(names) != len(actions) or actions.shape[1:] != (7,):
        raise ValueError(f"episode {raw.get('__key__')}: {len(names)} frames for actions {actions.shape}")
    return {"key": raw["__key__"], "jpegs": [raw[n] for n in names], "actions": actions,
            "instruction": raw["instruction.txt"].decode("utf-8"),
            "meta": json.loads(raw["meta.json"]) if "meta.json" in raw else {}}


def load_frame(jpeg: bytes, size: tuple[int, int], name: str) -> np.ndarray:
    """JPEG → ``(3, H, W)`` float32 in [−1, 1] at ``size = (H, W)`` (bicubic with antialiasing, as the
    policy does at test time); one over PIL's decompression-bomb bound is a ``ValueError`` naming ``name``."""
    img = decode_rgb(jpeg, name)
    if img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.Resampling.BICUBIC)
    return np.asarray(img, np.float32).transpose(2, 0, 1) / 127.5 - 1


def cut_window(episode: dict[str, Any], start: int, frames: int, chunk: int, size: tuple[int, int],
               normalizer: ActionNormalizer) -> dict[str, Any]:
    """One window (see the module docstring): ``frames (3, F, H, W)``, ``actions (K, 7)`` normalised,
    ``action_mask (K,)`` bool, ``caption``."""
    t = len(episode["jpegs"])
    target = normalizer.training_target(episode["actions"])  # (T, 7), absolute gripper if configured
    idx = [min(start + f, t - 1) for f in range(frames)]
    video = np.stack([load_frame(episode["jpegs"][i], size, f"{episode['key']} frame {i}") for i in idx], 1)
    acts = np.zeros((chunk, 7), np.float32)
    mask = np.zeros(chunk, bool)
    n = min(chunk, t - start)
    acts[:n], mask[:n] = target[start:start + n], True
    if n < chunk:
        acts[n:] = normalizer.normalize(np.zeros(7, np.float32))  # zero motion, and a relative gripper's
        if normalizer.gripper == "absolute":  # "no change" (0); an absolute one holds its last state
            acts[n:, 6] = target[-1, 6]
    return {"frames": torch.from_numpy(video), "actions": torch.from_numpy(acts),
            "action_mask": torch.from_numpy(mask), "caption": episode["instruction"]}


def window_start(seed: int, epoch: int, key: str, length: int) -> int:
    h = hashlib.sha256(f"{seed}/{epoch}/{key}".encode()).digest()
    return int.from_bytes(h[:8], "big") % length


def collate_windows(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"frames": torch.stack([w["frames"] for w in items]),  # (B, 3, F, H, W)
            "actions": torch.stack([w["actions"] for w in items]),  # (B, K, 7)
            "action_mask": torch.stack([w["action_mask"] for w in items]),  # (B, K)
            "captions": [w["caption"] for w in items]}


@dataclass(frozen=True)
class WindowDecoder:
    """A shard-stream decoder: an episode's tar members → one window, its start drawn from
    ``(seed, epoch, key)``; raises (the stream skips and counts the episode) on a corrupt one."""

    normalizer: ActionNormalizer
    frames: int
    chunk: int
    size: tuple[int, int]
    seed: int

    def __call__(self, raw: dict[str, Any], epoch: int) -> dict[str, Any]:
        ep = decode_episode(raw)
        start = window_start(self.seed, epoch, ep["key"], len(ep["jpegs"]))
        return cut_window(ep, start, self.frames, self.chunk, self.size, self.normalizer)


def episode_window_stream(urls: list[str], batch_size: int, normalizer: ActionNormalizer, frames: int,
                          chunk: int, size: tuple[int, int], seed: int = 0, rank: int = 0,
                          world_size: int = 1) -> ShardStream:
    """The shard stream (rank split, seeded shard order, resumable position, corrupt episodes skipped)
    over episodes, yielding one window per episode."""
    return ShardStream(urls, batch_size, collate_windows, seed, rank, world_size, shape_key=None,
                       decode=WindowDecoder(normalizer, frames, chunk, size, seed))
