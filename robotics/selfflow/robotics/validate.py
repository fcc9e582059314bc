"""Validation of an ``rt1`` model on the held-out episodes (the ``val`` split of ``selfflow prepare rt1``).

Metrics (anchors §5.5), over the valid (unpadded) steps of one window per held-out episode:

- ``action_l1`` / ``action_mse``: sampled chunks (the policy's own sampler, current frame + instruction)
  against the recorded actions, normalised units; ``action_l1_raw`` / ``action_mse_raw`` in raw units
  (de-normalised; m, rad, gripper);
- ``gripper_accuracy``: absolute gripper: the binarised state (open ≥ 0) matches; relative: the command
  rounded to {−1, 0, +1} matches;
- ``val_loss_fm_video`` / ``val_loss_fm_action``: flow-matching MSE of the future frames / actions at fixed
  levels t ∈ {0.25, 0.5, 0.75} (both groups at t, the current frame clean when trained so), fixed noise.
"""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selfflow.core.data.shard_format import shard_urls
from selfflow.core.data.shard_stream import ShardStream
from selfflow.core.modulation import TokenTimesteps
from selfflow.core.timesteps import interpolate, target_velocity

from .dataset import episode_window_stream
from .policy import SelfFlowPolicy


def val_episodes(root: Path) -> int | None:
    """Validation episodes of a prepared data set, from its ``manifest.json`` (None without one)."""
    manifest = root / "manifest.json"
    return json.loads(manifest.read_text())["episodes"]["val"] if manifest.is_file() else None


def val_stream(modality, batch_size: int = 8, seed: int = 0) -> tuple[ShardStream, int]:
    """A stream over the modality's ``val`` split and the number of its batches that covers it once."""
    o = modality.options
    count = val_episodes(modality.root)
    count = batch_size if count is None else count
    if count < 1:
        raise ValueError(f"{modality.root} holds no validation episodes (prepare with a val fraction > 0)")
    bs = min(batch_size, count)
    stream = episode_window_stream(shard_urls(modality.root / "val"), bs, modality.normalizer, o.frames, o.chunk,
                                 tuple(o.image_size), seed)
    return stream, max(1, count // bs)


@torch.no_grad()
def flow_losses(model: torch.nn.Module, modality, tokens, cond, levels: tuple[float, ...], seed: int
                ) -> dict[str, float]:
    """Mean flow-matching MSE of the future-video and action tokens at fixed levels ``t``."""
    o = modality.options
    x0 = tokens.x
    b, _, width = x0.shape
    groups = modality.group_index(x0.device)  # (L,): 0 context (clean), 1 future video, 2 actions
    clean = o.schedule is not None and o.context == "clean"
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(x0)
    cv, ca = modality.video_channels, 7 * modality.action_copies
    schedule = modality.token_schedule()
    content = schedule.channel_mask(groups, width) if schedule is not None else None  # (L, C)
    out = {"val_loss_fm_video": 0.0, "val_loss_fm_action": 0.0}
    for t in levels:
        level = torch.where(groups == 0, 0, 1) if clean else torch.ones_like(groups)
        tt = TokenTimesteps.from_levels(torch.tensor([[0.0, t]], device=x0.device).expand(b, -1),
                                        level[None].expand(b, -1))
        x_t = interpolate(x0, noise, tt.dense())
        if content is not None:  # as in training: padding and flags are not noised
            x_t = torch.where(content, x_t, x0)
        sq = (model(x_t, tokens.ids, tt, cond, modality=modality.name) - target_velocity(x0, noise)).float() ** 2
        out["val_loss_fm_video"] += float(sq[:, groups == 1, :cv].mean()) / len(levels)
        out["val_loss_fm_action"] += float(sq[:, groups == 2, :ca].mean()) / len(levels)
    return out


def validate(model: torch.nn.Module, modality, *, batch_size: int = 8, max_batches: int = 4, steps: int = 10,
             seed: int = 0, device: torch.device | str = "cpu",
             levels: tuple[float, ...] = (0.25, 0.5, 0.75), video: str = "joint") -> dict[str, Any]:
    """The metrics of the module docstring for ``model`` (EMA weights, eval mode) on the val split; ``video``:
    the policy's future-frame mode (:class:`SelfFlowPolicy`), as the rollouts use it."""
    model.eval()
    stream, covering = val_stream(modality, batch_size, seed)
    policy = SelfFlowPolicy(model, modality, steps=steps, seed=seed, device=device, video=video)
    norm = modality.normalizer
    sums: dict[str, float] = {}
    n_steps = n_batches = n_windows = 0
    for i, batch in enumerate(islice(iter(stream), min(covering, max_batches))):
        tokens, cond = modality.encode(batch, device)
        pred = norm.clip(policy.sample(batch["frames"][:, :, 0], cond)).cpu().numpy()  # (B, K, 7)
        gt = batch["actions"].numpy()
        valid = batch["action_mask"].numpy().astype(bool)  # (B, K)
        p, g = pred[valid], gt[valid]  # (N, 7)
        pr, gr = norm.denormalize(p), norm.denormalize(g)
        if norm.gripper == "absolute":
            grip = (p[:, 6] >= 0) == (g[:, 6] >= 0)
        else:
            grip = np.rint(np.clip(p[:, 6], -1, 1)) == np.rint(g[:, 6])
        batch_sums = {"action_l1": np.abs(p - g).mean(1).sum(), "action_mse": ((p - g) ** 2).mean(1).sum(),
                      "action_l1_raw": np.abs(pr - gr).mean(1).sum(), "action_mse_raw": ((pr - gr) ** 2).mean(1).sum(),
                      "gripper_accuracy": grip.sum()}
        for k, v in batch_sums.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        for k, v in flow_losses(model, modality, tokens, cond, levels, seed + i).items():
            sums[k] = sums.get(k, 0.0) + v
        n_steps += int(valid.sum())
        n_batches += 1
        n_windows += len(gt)
    out: dict[str, Any] = {k: v / max(n_steps, 1) for k, v in sums.items() if not k.startswith("val_loss")}
    out.update({k: v / n_batches for k, v in sums.items() if k.startswith("val_loss")})
    out.update({"windows": n_windows, "action_steps": n_steps, "sampler_steps": steps})
    return out
