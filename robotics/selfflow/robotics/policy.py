"""Self-Flow as a policy, and its SIMPLER adapter.

:class:`SelfFlowPolicy` samples a normalised action chunk ``(K, 7)`` from the current image and the
instruction with Euler steps (t = 1 → 0). Under the rt1 token schedule (``context: clean``, the default) the
current frame's tokens stay the observed frame at t = 0 — exactly what training showed — while the action
tokens (and the future frames, ``video="joint"``: "imagine-then-act") are integrated from noise; with
``video="marginal"`` the future frames stay pure noise at t = 1 (the schedule's ``policy`` mode) and only
the actions move. A legacy run (``schedule: null``, noised context) pins the context tokens at each step to
the observed frame's noisy interpolant ``(1 − t)·x0 + t·ε`` instead, the level training noised them to.

:class:`SimplerPolicyAdapter` follows SIMPLER's duck-typed policy contract: ``reset(task_description)``
and ``step(image, task_description) → (raw_action, action)`` with float64 ``world_vector (3)``,
``rot_axangle (3)``, ``gripper (1)`` (relative: +1 close, −1 open) and ``terminate_episode (1)``. It runs
the first ``exec_horizon`` actions of each chunk, makes the gripper sticky, and resets when the
instruction changes (Open-and-Place switches subtask mid-episode).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from itertools import pairwise
from typing import Literal

import numpy as np
import torch
from PIL import Image

from selfflow.core.modulation import TokenTimesteps
from selfflow.core.timesteps import interpolate
from selfflow.core.tokens import Conditioning

from .normalize import ActionNormalizer, gripper_abs_to_rel, rpy_to_axis_angle

ChunkFn = Callable[[np.ndarray, str], np.ndarray]  # (image (H, W, 3) uint8, instruction) → (K, 7) normalised


class SelfFlowPolicy:
    """A trained ``rt1`` model (EMA weights) → :data:`ChunkFn`."""

    def __init__(self, model: torch.nn.Module, modality, steps: int = 10, seed: int = 0,
                 device: torch.device | str = "cpu", video: Literal["joint", "marginal"] = "joint"):
        if modality.options.patch[0] != 1:
            raise ValueError(f"the policy pins the current frame's tokens: it needs data.options.patch[0] = 1 "
                             f"(got {modality.options.patch}), so that no token mixes it with a future frame")
        if video == "marginal" and (modality.options.schedule is None or modality.options.context != "clean"):
            raise ValueError("video='marginal' needs a run trained with the rt1 token schedule (its policy mode)")
        self.model, self.modality, self.steps, self.device = model.eval(), modality, steps, torch.device(device)
        self.video = video
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    def frame(self, image: np.ndarray) -> torch.Tensor:
        """``(H0, W0, 3)`` uint8 → ``(3, H, W)`` in [−1, 1] at the model's size (bicubic, antialiased,
        as the training data loader)."""
        h, w = self.modality.options.image_size
        img = Image.fromarray(np.asarray(image, np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
        return torch.from_numpy(np.asarray(img, np.float32).transpose(2, 0, 1) / 127.5 - 1)

    @torch.no_grad()
    def __call__(self, image: np.ndarray, instruction: str) -> np.ndarray:
        m = self.modality
        if m.conditioner.encoder is not None:
            from selfflow.text.conditioning import caption_conditioning

            cond = caption_conditioning(m.conditioner.encoder, [instruction], self.device)
        else:
            cond = m.conditioner.from_batch(m.with_labels({"captions": [instruction]}), self.device)
        return m.normalizer.clip(self.sample(self.frame(image)[None], cond)[0]).float().cpu().numpy()

    @torch.no_grad()
    def sample(self, current: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Current frames ``(B, 3, H, W)`` in [−1, 1] and their conditioning → normalised chunks ``(B, K, 7)``
        (not clamped)."""
        m, o = self.modality, self.modality.options
        b = current.shape[0]
        frames = torch.zeros(b, 3, o.frames, *o.image_size)
        frames[:, :, 0] = current.cpu()
        x0 = m.pack(frames.to(self.device), torch.zeros(b, o.chunk, 7, device=self.device)).x  # (B, L, C)
        ids = m.sample_ids(b, self.device)
        noise = torch.randn(x0.shape, generator=self.generator, device=self.device)
        ts = torch.linspace(1.0, 0.0, self.steps + 1, device=self.device)
        if o.schedule is None or o.context != "clean":
            context = (ids[..., 0] < 1) & (torch.arange(ids.shape[1], device=self.device) < m.num_video_tokens)
            context = context[..., None]  # (B, L, 1): video tokens of latent frame 0
            x = noise.clone()
            for t, t_next in pairwise(ts):
                x = torch.where(context, interpolate(x0, noise, t.expand(b)), x)
                x = x + (t_next - t) * self.model(x, ids, t.expand(b), cond, modality=m.name)
            return m.unpack(x)[1]
        groups = m.group_index(self.device)  # (L,): 0 context, 1 future video, 2 actions
        level = torch.where(groups == 0, 0, 1)
        if self.video == "marginal":
            level = torch.where(groups == 1, 2, level)
        index = level[None].expand(b, -1)  # (B, L) into the levels [0, t, 1]
        content = m.token_schedule().channel_mask(groups, x0.shape[-1])  # (L, C): padding/flags stay data
        content = torch.ones_like(x0[0], dtype=torch.bool) if content is None else content
        moving = (level == 1)[:, None] & content  # (L, C)
        x = torch.where((groups == 0)[:, None] | ~content, x0, noise)  # (B, L, C): noise on moving/held content
        for t, t_next in pairwise(ts):
            levels = torch.stack([torch.zeros_like(t), t, torch.ones_like(t)])[None].expand(b, -1)  # (B, 3)
            v = self.model(x, ids, TokenTimesteps.from_levels(levels, index), cond, modality=m.name)
            x = torch.where(moving, x + (t_next - t) * v, x)
        return m.unpack(x)[1]


class SimplerPolicyAdapter:
    """SIMPLER policy wrapper around a :data:`ChunkFn` (see the module docstring).

    ``gripper="absolute"``: the model predicts the gripper state (−1 closed, +1 open); a state change
    becomes a relative command (+1 close / −1 open) that is then repeated for ``sticky_steps`` steps
    (the Google robot's controller moves by relative targets; without the repeat grasps fail).
    ``gripper="relative"``: the command is passed through, |g| < 0.01 → 0, as SIMPLER's RT-1 wrapper.
    """

    def __init__(self, chunk_fn: ChunkFn, normalizer: ActionNormalizer, *, exec_horizon: int = 2,
                 sticky_steps: int = 15, gripper: Literal["absolute", "relative"] = "absolute",
                 rotation: Literal["axis_angle", "rpy"] = "axis_angle"):
        if exec_horizon < 1 or sticky_steps < 1:
            raise ValueError("exec_horizon and sticky_steps must be ≥ 1")
        self.chunk_fn, self.normalizer = chunk_fn, normalizer
        self.exec_horizon, self.sticky_steps, self.gripper, self.rotation = exec_horizon, sticky_steps, gripper, rotation
        self.task_description: str | None = None
        self.reset(None)

    def reset(self, task_description: str | None) -> None:
        """Forget the action queue and gripper state (the robot starts with the gripper open)."""
        self.task_description = task_description
        self.queue: deque[np.ndarray] = deque()
        self.previous_state = 1.0
        self.sticky_value, self.sticky_left = 0.0, 0
        self.chunks = 0

    def _gripper_command(self, g: float) -> float:
        if self.gripper == "relative":
            return 0.0 if abs(g) < 1e-2 else float(np.clip(g, -1, 1))
        state = 1.0 if g >= 0 else -1.0
        command = gripper_abs_to_rel(state, self.previous_state)
        self.previous_state = state
        if command != 0.0 and self.sticky_left == 0:
            self.sticky_value, self.sticky_left = command, self.sticky_steps
        if self.sticky_left:
            self.sticky_left -= 1
            return self.sticky_value
        return 0.0

    def step(self, image: np.ndarray, task_description: str | None = None, **kwargs) -> tuple[dict, dict]:
        if task_description is not None and task_description != self.task_description:
            self.reset(task_description)
        if not self.queue:
            chunk = np.asarray(self.chunk_fn(image, self.task_description or ""), np.float32)
            if chunk.ndim != 2 or chunk.shape[1] != 7:
                raise ValueError(f"the policy returned a chunk of shape {chunk.shape}, expected (K, 7)")
            self.queue.extend(self.normalizer.denormalize(chunk)[: self.exec_horizon])
            self.chunks += 1
        raw = self.queue.popleft().astype(np.float64)
        rot = raw[3:6] if self.rotation == "axis_angle" else rpy_to_axis_angle(raw[3:6])
        action = {"world_vector": raw[0:3].copy(), "rot_axangle": np.asarray(rot, np.float64),
                  "gripper": np.array([self._gripper_command(float(raw[6]))], np.float64),
                  "terminate_episode": np.array([0.0], np.float64)}
        raw_action = {"world_vector": raw[0:3], "rotation_delta": raw[3:6], "gripper": raw[6:7]}
        return raw_action, action
