"""``FakeGoogleRobotEnv``: a stand-in with SIMPLER's Google-robot interface — NOT SIMPLER.

It mimics only the surface the adapter and the evaluation driver touch (``reset(seed, options)``,
``step(a7)`` returning ``(obs, reward, terminated, truncated, info)``, ``obs["image"]["overhead_camera"]
["rgb"]`` as uint8 512×640×3, ``get_language_instruction()``, ``is_final_subtask()``,
``advance_to_next_subtask()``, truncation at ``max_episode_steps``, ``terminated`` re-evaluated every
step as ``success``). Its physics is a toy: a 2-D end effector moved by ``world_vector[:2]`` towards a goal
drawn into the image; success when within ``tolerance`` on the final subtask with the gripper in the
wanted state. Every number it produces is labelled ``env: fake`` by the driver.
"""

from __future__ import annotations

from typing import Any

import numpy as np

HEIGHT, WIDTH = 512, 640


class FakeGoogleRobotEnv:
    robot_uid = "google_robot_static"

    def __init__(self, instructions: list[str], max_episode_steps: int = 80,
                 force_advance_at: int | None = None, tolerance: float = 0.03, need_closed: bool = False):
        if not instructions:
            raise ValueError("FakeGoogleRobotEnv needs at least one instruction (one per subtask)")
        self.instructions, self.max_episode_steps = list(instructions), max_episode_steps
        self.force_advance_at, self.tolerance, self.need_closed = force_advance_at, tolerance, need_closed
        self.reset()

    # --- SIMPLER surface --------------------------------------------------------------------------
    def reset(self, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[dict, dict]:
        rng = np.random.default_rng(seed)
        self.ee = np.array([0.0, 0.0])
        self.goal = rng.uniform(-0.15, 0.15, 2)
        self.gripper_closed = False
        self.subtask, self.elapsed = 0, 0
        self.options = dict(options or {})
        return self._obs(), {"episode_options": self.options}

    def step(self, action: np.ndarray) -> tuple[dict, float, bool, bool, dict]:
        a = np.asarray(action, np.float64)
        if a.shape != (7,):
            raise ValueError(f"FakeGoogleRobotEnv.step expects a 7-D action, got shape {a.shape}")
        self.ee = np.clip(self.ee + a[:2], -0.3, 0.3)
        if a[6] > 0.5:
            self.gripper_closed = True
        elif a[6] < -0.5:
            self.gripper_closed = False
        self.elapsed += 1
        if self.force_advance_at is not None and self.elapsed == self.force_advance_at:
            self.advance_to_next_subtask()
        success = self.is_final_subtask() and bool(np.linalg.norm(self.ee - self.goal) < self.tolerance) and (
            self.gripper_closed or not self.need_closed)
        truncated = self.elapsed >= self.max_episode_steps
        return self._obs(), float(success), success, truncated, {"success": success, "elapsed_steps": self.elapsed}

    def get_language_instruction(self) -> str:
        return self.instructions[self.subtask]

    def is_final_subtask(self) -> bool:
        return self.subtask == len(self.instructions) - 1

    def advance_to_next_subtask(self) -> None:
        self.subtask = min(self.subtask + 1, len(self.instructions) - 1)

    # --- toy helpers ------------------------------------------------------------------------------
    def oracle_action(self) -> np.ndarray:
        """A scripted action towards the goal (closing the gripper if needed): checks the driver only."""
        delta = np.clip(self.goal - self.ee, -0.02, 0.02)
        return np.array([*delta, 0.0, 0.0, 0.0, 0.0, 1.0 if self.need_closed and not self.gripper_closed else 0.0])

    def _pixel(self, p: np.ndarray) -> tuple[int, int]:
        return int((p[1] + 0.3) / 0.6 * (HEIGHT - 1)), int((p[0] + 0.3) / 0.6 * (WIDTH - 1))

    def _obs(self) -> dict:
        img = np.full((HEIGHT, WIDTH, 3), 90, np.uint8)
        for p, colour in ((self.goal, (40, 200, 40)), (self.ee, (200, 40, 40))):
            y, x = self._pixel(p)
            img[max(0, y - 12):y + 12, max(0, x - 12):x + 12] = colour
        return {"image": {"overhead_camera": {"rgb": img}}, "agent": {"qpos": np.zeros(11)},
                "extra": {"tcp_pose": np.array([*self.ee, 0.0, 1.0, 0.0, 0.0, 0.0])}}
