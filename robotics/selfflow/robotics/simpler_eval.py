"""SIMPLER evaluation driver: visual-matching sweeps, SIMPLER's episode loop, JSON results.

The loop is SIMPLER's evaluator (``maniskill2_evaluator.py``): reset, read the instruction, then step
until the policy predicts termination on the final subtask or the env truncates at
``max_episode_steps``; a predicted termination on an earlier subtask advances the env to the next one.
Success is the env's ``terminated`` **at the final step** (the official mode); success at any step is
recorded beside it. ``simpler_env`` is imported only when a real run starts.

Visual-matching sweeps (official scripts): Move Near = 4 URDF recolourings × 60 object episodes
(``MoveNearGoogleBakedTexInScene-v0``, 80 steps, 240 episodes); Open Top Drawer and Place Apple = 4 URDFs ×
3 overlays/robot poses (a0, b0, c0) × 9 apple positions (``PlaceIntoClosedTopDrawerCustomInScene-v0``,
200 steps, 108 episodes, subtask forced at step 100).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from selfflow.core.data.shard_writer import write_json
from selfflow.core.settings_record import changed_settings

from .fake_env import FakeGoogleRobotEnv

URDFS = [None, "recolor_tabletop_visual_matching_1", "recolor_tabletop_visual_matching_2",
         "recolor_cabinet_visual_matching_1"]
SIMPLER_INSTALL = """simpler_env is not installed. SIMPLER needs an NVIDIA GPU (Vulkan), Python ≤ 3.11 and git:
  git clone https://github.com/simpler-env/SimplerEnv --recurse-submodules
  pip install numpy==1.26.4 'gymnasium<1.0' && pip install -e SimplerEnv/ManiSkill2_real2sim -e SimplerEnv
  (numpy < 2 for SimplerEnv, >= 1.26.4 for selfflow's scipy: best in a separate Python 3.11 environment with
  selfflow installed into it; then run with DISPLAY="" on a headless machine).
  For a labelled offline stand-in pass --env fake."""


@dataclass(frozen=True)
class TaskSpec:
    name: str
    simpler_task: str
    env_id: str
    max_episode_steps: int
    subtasks: tuple[str, ...]
    force_advance_at: int | None = None


TASKS = {
    "move_near": TaskSpec("move_near", "google_robot_move_near_v0", "MoveNearGoogleBakedTexInScene-v0", 80,
                          ("move blue plastic bottle near pepsi can",)),
    "open_top_drawer_place_apple": TaskSpec(
        "open_top_drawer_place_apple", "google_robot_place_apple_in_closed_top_drawer",
        "PlaceIntoClosedTopDrawerCustomInScene-v0", 200, ("open top drawer", "place apple into top drawer"),
        force_advance_at=100),
}


def visual_matching_episodes(task: str) -> list[dict[str, Any]]:
    """The visual-matching sweep of ``task``: one dict per episode (``variant`` = URDF version)."""
    if task == "move_near":
        return [{"variant": str(u), "urdf_version": u, "obj_episode_id": i} for u in URDFS for i in range(60)]
    if task == "open_top_drawer_place_apple":
        return [{"variant": str(u), "urdf_version": u, "overlay": o, "apple_grid_index": g}
                for u in URDFS for o in ("a0", "b0", "c0") for g in range(9)]
    raise KeyError(f"unknown task {task!r}; choose from {sorted(TASKS)}")


def run_episode(env, policy, max_steps: int) -> dict[str, Any]:
    """SIMPLER's episode loop (see the module docstring) → ``success``, ``success_any_step``, ``length``."""
    obs, _ = env.reset(**getattr(env, "_episode_reset_kwargs", {}))
    instruction = env.get_language_instruction()
    policy.reset(instruction)
    terminated_by_policy = truncated = done = success_any = False
    length, instructions = 0, [instruction]
    while not (terminated_by_policy or truncated) and length < max_steps:
        _, action = policy.step(obs["image"]["overhead_camera"]["rgb"], instruction)
        terminated_by_policy = bool(action["terminate_episode"][0] > 0)
        if terminated_by_policy and not env.is_final_subtask():
            terminated_by_policy = False
            env.advance_to_next_subtask()
        a7 = np.concatenate([action["world_vector"], action["rot_axangle"], action["gripper"]])
        obs, _, done, truncated, _ = env.step(a7)
        success_any |= bool(done)
        length += 1
        new = env.get_language_instruction()
        if new != instruction:
            instruction = new
            instructions.append(new)
    return {"success": bool(done), "success_any_step": success_any, "length": length,
            "instructions": instructions}


def make_fake_env(spec: TaskSpec, episode: dict[str, Any], seed: int) -> FakeGoogleRobotEnv:
    env = FakeGoogleRobotEnv(list(spec.subtasks), spec.max_episode_steps, spec.force_advance_at)
    env._episode_reset_kwargs = {"seed": seed, "options": dict(episode)}
    return env


# What a prepackaged SIMPLER env draws itself at every (seeded) reset, whatever the sweep asked for: the URDF
# recolouring and, for the drawer task, the overlay / robot pose and the apple position (reference notes §1.2).
DRAWN_BY_ENV = ("urdf_version", "overlay", "apple_grid_index")


def make_simpler_env(spec: TaskSpec, episode: dict[str, Any], seed: int):
    """A real SIMPLER env for one sweep episode: the prepackaged config (``simpler_env.make``), which draws
    the URDF, overlay and apple position at reset from the seed — so only the (Move Near) object episode id is
    passed, and :func:`evaluate` does not label rows with the sweep's URDF/overlay/apple. Not exercised offline
    (no GPU here): check the keyword names against your SimplerEnv checkout."""
    try:
        import simpler_env
    except ImportError:
        raise SystemExit(SIMPLER_INSTALL) from None
    env = simpler_env.make(spec.simpler_task)
    obj = {k: v for k, v in (("episode_id", episode.get("obj_episode_id")),) if v is not None}
    env._episode_reset_kwargs = {"seed": seed, "options": {"obj_init_options": obj} if obj else {}}
    return env


def finished_rows(out: Path, settings: dict[str, Any]) -> dict[tuple[str, int], dict[str, Any]]:
    """The rows an earlier run of these ``settings`` wrote to ``out/episodes.jsonl`` (a sweep takes hours: a
    rerun continues it), keyed by (task, episode); ``settings.json`` records the settings, and other ones are
    refused, naming them. A line cut short by a kill is dropped, and the file rewritten without it."""
    record, rows_file = out / "settings.json", out / "episodes.jsonl"
    if changed := changed_settings(record, settings, informative=("run",)):  # "weights" says which model
        raise ValueError(f"{out} holds episodes run with other settings ({'; '.join(changed)}): give the same "
                         "ones to continue, or another --out")
    write_json(record, settings)
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    if rows_file.is_file():
        for line in rows_file.read_text().splitlines():
            try:
                row = json.loads(line)
                rows[row["task"], int(row["episode"])] = row
            except (ValueError, KeyError, TypeError):
                continue
        rows_file.write_text("".join(json.dumps(r) + "\n" for r in rows.values()))
    return rows


def evaluate(policy_factory: Callable[[Any], Any], tasks: list[str], env_kind: str, out_dir: str | Path,
             limit: int | None = None, seed: int = 0, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the sweeps; write ``episodes.jsonl`` (a row as each episode ends) and ``summary.json`` under
    ``out_dir``; return the summary. A rerun with the same ``settings`` (what changes the numbers: the run, the
    policy's sampler and execution flags; recorded in ``settings.json`` and the summary) and seed runs only the
    episodes not yet in ``episodes.jsonl``.

    ``policy_factory(env)`` returns the policy for one episode (the scripted fake oracle needs the env).
    """
    if env_kind not in ("fake", "simpler"):
        raise ValueError(f"env must be 'fake' or 'simpler', got {env_kind!r}")
    make_env = make_fake_env if env_kind == "fake" else make_simpler_env
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"env": env_kind, "seed": seed, **(settings or {})}
    done = finished_rows(out, settings)
    label = "fake (FakeGoogleRobotEnv stand-in, NOT SIMPLER)" if env_kind == "fake" else "simpler"
    config = ("toy goal per seeded reset" if env_kind == "fake" else "prepackaged_config; Move Near obj "
              "episode_id set per episode; URDF, overlay and apple position drawn by the env at reset (seeded), "
              "so no per-URDF rates")
    summary: dict[str, Any] = {"env": "fake" if env_kind == "fake" else "simpler", "env_description": label,
                               "episode_config": config, "success_mode": "final_step", "settings": settings,
                               "tasks": {}}
    with (out / "episodes.jsonl").open("a") as f:
        for task in tasks:
            spec = TASKS[task]
            episodes = visual_matching_episodes(task)[:limit] if limit else visual_matching_episodes(task)
            rows = []
            for i, ep in enumerate(episodes):
                if (task, i) in done:
                    rows.append(done[task, i])
                    continue
                env = make_env(spec, ep, seed + i)
                try:
                    result = run_episode(env, policy_factory(env), spec.max_episode_steps)
                finally:
                    if callable(close := getattr(env, "close", None)):
                        close()  # one simulator per episode: 348 of them in a full sweep
                if env_kind == "simpler":  # the row says what ran: the env's own draw from this seed
                    ep = {**{k: v for k, v in ep.items() if k not in DRAWN_BY_ENV},
                          "variant": f"drawn by the env at reset (seed {seed + i})"}
                row = {"env": summary["env"], "task": task, "env_id": spec.env_id, "episode": i, "seed": seed + i,
                       **ep, **result, "success_mode": "final_step", "max_episode_steps": spec.max_episode_steps}
                rows.append(row)
                f.write(json.dumps(row) + "\n")
                f.flush()  # a killed sweep keeps every finished episode
            variants: dict[str, list[bool]] = {}
            for r in rows:
                variants.setdefault(r["variant"], []).append(r["success"])
            summary["tasks"][task] = {
                "env_id": spec.env_id, "protocol": "visual_matching", "episodes": len(rows),
                "full_sweep_episodes": len(visual_matching_episodes(task)),
                "max_episode_steps": spec.max_episode_steps, "success_mode": "final_step",
                "success_rate": float(np.mean([r["success"] for r in rows])),
                "success_rate_any_step": float(np.mean([r["success_any_step"] for r in rows])),
                # per URDF (fake env: its labels); None on SIMPLER, whose prepackaged env draws the URDF itself
                "per_variant": None if env_kind == "simpler" else {
                    v: float(np.mean(s)) for v, s in variants.items()}}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
