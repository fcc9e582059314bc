import json
import sys

import numpy as np
import pytest
import torch

from selfflow.core.backbones import build_backbone
from selfflow.core.config import load_config
from selfflow.core.run_setup import build_model_config
from selfflow.robotics.fake_env import FakeGoogleRobotEnv
from selfflow.robotics.modality import RT1Modality
from selfflow.robotics.normalize import ActionNormalizer, ActionStats
from selfflow.robotics.policy import SelfFlowPolicy, SimplerPolicyAdapter
from selfflow.robotics.simpler_eval import (
    TASKS,
    evaluate,
    make_fake_env,
    run_episode,
    visual_matching_episodes,
)

IDENTITY = ActionNormalizer(ActionStats(count=1, mean=[0.0] * 7, std=[1.0] * 7, min=[-1.0] * 7, max=[1.0] * 7,
                                        q01=[-1.0] * 7, q99=[1.0] * 7))
IMAGE = np.zeros((512, 640, 3), np.uint8)


class Chunks:
    """A scripted chunk function that records its calls."""

    def __init__(self, chunks):
        self.chunks, self.calls = list(chunks), []

    def __call__(self, image, text):
        self.calls.append(text)
        return self.chunks[min(len(self.calls) - 1, len(self.chunks) - 1)]


def test_adapter_contract_shapes_dtypes_and_replanning_cadence():
    chunk = np.tile(np.array([0.1, -0.2, 0.3, 0.01, 0.02, 0.03, 1.0], np.float32), (4, 1))
    chunk[:, 0] = [0.1, 0.2, 0.3, 0.4]
    fn = Chunks([chunk])
    pol = SimplerPolicyAdapter(fn, IDENTITY, exec_horizon=2)
    pol.reset("pick coke can")
    xs = []
    for _ in range(5):
        _raw, act = pol.step(IMAGE, "pick coke can")
        assert set(act) == {"world_vector", "rot_axangle", "gripper", "terminate_episode"}
        assert [act[k].shape for k in ("world_vector", "rot_axangle", "gripper", "terminate_episode")] == [
            (3,), (3,), (1,), (1,)]
        assert all(v.dtype == np.float64 for v in act.values())
        assert act["terminate_episode"][0] == 0.0
        xs.append(act["world_vector"][0])
    np.testing.assert_allclose(xs, [0.1, 0.2, 0.1, 0.2, 0.1], rtol=1e-6)  # first 2 of each chunk
    assert len(fn.calls) == 3
    np.testing.assert_allclose(act["rot_axangle"], [0.01, 0.02, 0.03], rtol=1e-6)


def test_sticky_gripper_close_then_open():
    # absolute gripper: open (+1) for 2 steps, then closed (−1) for good
    states = [1, 1] + [-1] * 40
    fn = Chunks([np.array([[0, 0, 0, 0, 0, 0, s]], np.float32) for s in states])
    pol = SimplerPolicyAdapter(fn, IDENTITY, exec_horizon=1, sticky_steps=15)
    pol.reset("pick coke can")
    cmds = [pol.step(IMAGE, "pick coke can")[1]["gripper"][0] for _ in range(25)]
    assert cmds[:2] == [0.0, 0.0]
    assert cmds[2:17] == [1.0] * 15  # +1 = close, held for 15 steps
    assert cmds[17:] == [0.0] * 8
    rel = SimplerPolicyAdapter(Chunks([np.array([[0, 0, 0, 0, 0, 0, 0.005]], np.float32),
                                       np.array([[0, 0, 0, 0, 0, 0, -0.7]], np.float32)]),
                               IDENTITY, exec_horizon=1, gripper="relative")
    rel.reset("x")
    assert rel.step(IMAGE, "x")[1]["gripper"][0] == 0.0 and rel.step(IMAGE, "x")[1]["gripper"][0] == pytest.approx(-0.7)


def test_instruction_change_resets_queue_and_gripper():
    fn = Chunks([np.array([[0, 0, 0, 0, 0, 0, -1.0]] * 4, np.float32)])
    pol = SimplerPolicyAdapter(fn, IDENTITY, exec_horizon=4)
    pol.reset("open top drawer")
    assert pol.step(IMAGE, "open top drawer")[1]["gripper"][0] == 1.0  # sticky close starts
    pol.step(IMAGE, "open top drawer")
    assert len(fn.calls) == 1
    pol.step(IMAGE, "place apple into top drawer")  # subtask switch: replan with the new instruction
    assert fn.calls == ["open top drawer", "place apple into top drawer"]
    assert pol.sticky_left == 14 and pol.task_description == "place apple into top drawer"


class Scripted:
    """Driver-test policy: follows env.oracle_action, optionally leaves after success, optionally
    predicts termination at a given step."""

    def __init__(self, env, leave_after=None, terminate_at=None, zero=False):
        self.env, self.leave_after, self.terminate_at, self.zero = env, leave_after, terminate_at, zero
        self.n, self.resets = 0, []

    def reset(self, text):
        self.resets.append(text)

    def step(self, image, text):
        self.n += 1
        a = np.zeros(7) if self.zero else self.env.oracle_action()
        if self.leave_after is not None and self.n > self.leave_after:
            a = np.array([0.02, 0.02, 0, 0, 0, 0, 0])
        term = 1.0 if self.terminate_at == self.n else 0.0
        return {}, {"world_vector": a[:3], "rot_axangle": a[3:6], "gripper": a[6:7],
                    "terminate_episode": np.array([term])}


def test_driver_final_step_vs_any_step_and_step_limit():
    spec = TASKS["move_near"]
    env = make_fake_env(spec, {"obj_episode_id": 0}, seed=1)
    ok = run_episode(env, Scripted(env), spec.max_episode_steps)
    assert ok["success"] and ok["length"] == 80  # no early stop on success: runs to the step limit
    env = make_fake_env(spec, {}, seed=1)
    undone = run_episode(env, Scripted(env, leave_after=30), spec.max_episode_steps)
    assert undone["success_any_step"] and not undone["success"]  # official mode: the final step counts
    env = make_fake_env(spec, {}, seed=1)
    assert not run_episode(env, Scripted(env, zero=True), spec.max_episode_steps)["success"]


def test_driver_subtasks_advance_on_termination_and_by_force():
    spec = TASKS["open_top_drawer_place_apple"]
    env = make_fake_env(spec, {}, seed=2)
    r = run_episode(env, Scripted(env, terminate_at=5), spec.max_episode_steps)
    assert r["instructions"] == ["open top drawer", "place apple into top drawer"] and r["length"] == 200
    assert r["success"]
    env = make_fake_env(spec, {}, seed=2)
    pol = Scripted(env, zero=True)
    r = run_episode(env, pol, spec.max_episode_steps)
    assert r["instructions"] == ["open top drawer", "place apple into top drawer"]  # forced at step 100
    env = make_fake_env(spec, {}, seed=2)
    r = run_episode(env, Scripted(env, terminate_at=150), spec.max_episode_steps)
    assert r["length"] == 150  # predicted termination on the final subtask ends the episode


def test_sweep_sizes_and_fake_env_surface():
    assert len(visual_matching_episodes("move_near")) == 240
    assert len(visual_matching_episodes("open_top_drawer_place_apple")) == 108
    env = FakeGoogleRobotEnv(["pick coke can"], max_episode_steps=3)
    obs, _ = env.reset(seed=0)
    rgb = obs["image"]["overhead_camera"]["rgb"]
    assert rgb.shape == (512, 640, 3) and rgb.dtype == np.uint8 and env.robot_uid == "google_robot_static"
    for i in range(3):
        *_, truncated, _ = env.step(np.zeros(7))
        assert truncated == (i == 2)
    with pytest.raises(ValueError, match="7-D"):
        env.step(np.zeros(6))


def test_evaluate_writes_labelled_json(tmp_path):
    summary = evaluate(lambda env: Scripted(env), ["move_near"], "fake", tmp_path, limit=3)
    assert summary["env"] == "fake" and summary["success_mode"] == "final_step"
    s = summary["tasks"]["move_near"]
    assert s["success_rate"] == 1.0 and s["episodes"] == 3 and s["max_episode_steps"] == 80
    rows = [json.loads(line) for line in (tmp_path / "episodes.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["env"] == "fake" and r["success_mode"] == "final_step" for r in rows)
    zero = evaluate(lambda env: Scripted(env, zero=True), ["move_near"], "fake", tmp_path / "z", limit=3)
    assert zero["tasks"]["move_near"]["success_rate"] == 0.0


def test_a_killed_sweep_continues_and_other_settings_are_refused(tmp_path):
    """Rows were held until the sweep ended and a rerun truncated them: hours of SIMPLER lost to one kill.
    Each row is now written as its episode ends, and a rerun runs only the missing ones."""
    calls = []

    def factory(env):
        calls.append(env)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed in the third episode
        return Scripted(env)

    with pytest.raises(KeyboardInterrupt):
        evaluate(factory, ["move_near"], "fake", tmp_path, limit=4, settings={"steps": 10})
    assert len((tmp_path / "episodes.jsonl").read_text().splitlines()) == 2
    with (tmp_path / "episodes.jsonl").open("a") as f:
        f.write('{"task": "move_near", "epis')  # a line cut short by the kill
    calls.clear()
    full = evaluate(lambda env: calls.append(env) or Scripted(env), ["move_near"], "fake", tmp_path, limit=4,
                    settings={"steps": 10})
    assert len(calls) == 2 and full["tasks"]["move_near"]["episodes"] == 4  # episodes 2 and 3 only
    rows = [json.loads(line) for line in (tmp_path / "episodes.jsonl").read_text().splitlines()]
    assert [r["episode"] for r in rows] == [0, 1, 2, 3]
    fresh = evaluate(lambda env: Scripted(env), ["move_near"], "fake", tmp_path / "fresh", limit=4)
    assert fresh["tasks"] == full["tasks"]
    with pytest.raises(ValueError, match=r"holds episodes run with other settings \(steps: 10 then, 20 now\)"):
        evaluate(lambda env: Scripted(env), ["move_near"], "fake", tmp_path, limit=4, settings={"steps": 20})


def test_a_sweep_is_continued_by_its_weights_not_by_where_the_run_lies(tmp_path):
    """The run's path is recorded, not compared: the same weights moved elsewhere continue the sweep, and a run
    trained on in place (same path, new weights) is refused instead of mixed into one success rate."""
    first = {"run": "/data/runs/a", "weights": "w1", "steps": 10}
    evaluate(lambda env: Scripted(env), ["move_near"], "fake", tmp_path, limit=1, settings=first)
    moved = evaluate(lambda env: Scripted(env), ["move_near"], "fake", tmp_path, limit=2,
                     settings={**first, "run": "/mnt/other/a"})
    assert moved["settings"]["run"] == "/mnt/other/a" and moved["tasks"]["move_near"]["episodes"] == 2
    with pytest.raises(ValueError, match=r"other settings \(weights: 'w1' then, 'w2' now\)"):
        evaluate(lambda env: Scripted(env), ["move_near"], "fake", tmp_path, limit=2, settings={**first, "weights": "w2"})


def test_selfflow_policy_chunk_is_bounded_and_seeded(fake_data_dir):
    cfg = load_config("configs/tiny/rt1.yaml", [f"data.options.fake_dir={fake_data_dir}"])
    m = RT1Modality(cfg.data.options)
    torch.manual_seed(0)
    model = build_backbone(build_model_config(cfg, m, uses_projector=False))
    torch.nn.init.normal_(model.final["rt1"].linear.weight, std=0.5)  # non-zero outputs for the test
    image = np.random.default_rng(0).integers(0, 255, (512, 640, 3), dtype=np.uint8)
    a = SelfFlowPolicy(model, m, steps=3, seed=7)(image, "open top drawer")
    b = SelfFlowPolicy(model, m, steps=3, seed=7)(image, "open top drawer")
    c = SelfFlowPolicy(model, m, steps=3, seed=8)(image, "open top drawer")
    assert a.shape == (4, 7) and np.isfinite(a).all() and np.abs(a).max() <= 1
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    m2 = RT1Modality({**cfg.data.options, "patch": (2, 8, 8), "context": "noised"})
    with pytest.raises(ValueError, match=r"patch\[0\] = 1"):
        SelfFlowPolicy(model, m2)


def _run_cli(argv, monkeypatch):
    import argparse

    from selfflow.robotics.cli import register

    monkeypatch.setitem(sys.modules, "simpler_env", None)  # as if SimplerEnv were not installed
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["simpler", *argv])
    return args.func(args)


def test_cli_needs_simpler_or_explicit_fake(tmp_path, monkeypatch, capsys):
    assert _run_cli(["--policy", "zero"], monkeypatch) == 2
    err = capsys.readouterr().err
    assert "selfflow: error: simpler_env is not installed" in err and "--env fake" in err
    assert _run_cli(["--env", "fake", "--policy", "oracle", "--limit", "2", "--out", str(tmp_path)], monkeypatch) == 0
    assert "[env: fake] move_near: success_rate 1.000" in capsys.readouterr().out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["env"] == "fake" and summary["settings"]["policy"] == "oracle"
    assert _run_cli(["--policy", "oracle"], monkeypatch) == 2  # never the oracle outside the fake env
    assert "exists only with --env fake" in capsys.readouterr().err  # said first, not the missing SimplerEnv


class _Spy(torch.nn.Module):
    """Wraps a backbone and records its inputs."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, x, ids, t, cond, **kw):
        self.calls.append((x.clone(), t))
        return self.model(x, ids, t, cond, **kw)


@pytest.mark.parametrize("video", ["joint", "marginal"])
def test_policy_keeps_the_context_clean_and_padding_fixed(fake_data_dir, video):
    """Under the token schedule the sampler feeds what training fed: the current frame clean at t = 0, the
    padding/flag channels as data, actions at t (and future frames at t, or held at pure noise, t = 1)."""
    cfg = load_config("configs/tiny/rt1.yaml", [f"data.options.fake_dir={fake_data_dir}"])
    m = RT1Modality(cfg.data.options)
    model = build_backbone(build_model_config(cfg, m, uses_projector=False))
    torch.nn.init.normal_(model.final["rt1"].linear.weight, std=0.5)
    spy = _Spy(model)
    image = np.random.default_rng(0).integers(0, 255, (512, 640, 3), dtype=np.uint8)
    policy = SelfFlowPolicy(spy, m, steps=3, seed=0, video=video)
    chunk = policy(image, "open top drawer")
    assert chunk.shape == (4, 7) and np.isfinite(chunk).all()
    groups = m.group_index()
    frames = torch.zeros(1, 3, 2, *m.options.image_size)
    frames[0, :, 0] = policy.frame(image)
    x0 = m.pack(frames, torch.zeros(1, 4, 7)).x
    first_noise = spy.calls[0][0]
    for step, (x, t) in enumerate(spy.calls):
        dense = t.dense()[0]
        level = 1 - step / 3
        assert torch.equal(x[0, groups == 0], x0[0, groups == 0]) and (dense[groups == 0] == 0).all()
        assert torch.equal(x[0, groups == 2, 7:], x0[0, groups == 2, 7:])  # action tokens' padding + flag
        assert torch.equal(x[0, groups == 1, 192:], x0[0, groups == 1, 192:])  # video tokens' padding + flag
        assert torch.allclose(dense[groups == 2], torch.tensor(level))
        if video == "marginal":
            assert (dense[groups == 1] == 1).all() and torch.equal(x[0, groups == 1], first_noise[0, groups == 1])
        else:
            assert torch.allclose(dense[groups == 1], torch.tensor(level))


def test_validation_metrics(fake_data_dir):
    from selfflow.robotics.validate import validate

    cfg = load_config("configs/tiny/rt1.yaml", [f"data.options.fake_dir={fake_data_dir}"])
    m = RT1Modality(cfg.data.options)
    model = build_backbone(build_model_config(cfg, m, uses_projector=False))
    out = validate(model, m, steps=2)
    assert out["windows"] >= 1 and out["action_steps"] >= 1
    for k in ("action_l1", "action_mse", "action_l1_raw", "action_mse_raw", "gripper_accuracy",
              "val_loss_fm_video", "val_loss_fm_action"):
        assert np.isfinite(out[k]), k
    assert 0 <= out["gripper_accuracy"] <= 1 and out["action_l1_raw"] > 0 and out["action_mse"] > 0
    # the zero-initialised head predicts v = 0: the sampled chunk is its starting noise, clamped to [−1, 1]
    assert out["val_loss_fm_action"] > 0.5


def test_simpler_rows_say_the_env_drew_the_variant(tmp_path, monkeypatch):
    """A prepackaged SIMPLER env draws URDF, overlay and apple position at reset: rows and summary must not label
    episodes with the sweep's URDFs (the per-URDF rates used to describe draws that never happened)."""
    import types

    from selfflow.robotics.fake_env import FakeGoogleRobotEnv
    from selfflow.robotics.simpler_eval import TASKS

    made = []

    def make(task, **kwargs):
        made.append((task, kwargs))
        spec = next(s for s in TASKS.values() if s.simpler_task == task)
        return FakeGoogleRobotEnv(list(spec.subtasks), spec.max_episode_steps, spec.force_advance_at)

    monkeypatch.setitem(sys.modules, "simpler_env", types.SimpleNamespace(make=make))
    summary = evaluate(lambda env: Scripted(env, zero=True), ["open_top_drawer_place_apple"], "simpler", tmp_path,
                       limit=2, seed=5)
    assert made == [("google_robot_place_apple_in_closed_top_drawer", {})] * 2  # no urdf_version it would ignore
    task = summary["tasks"]["open_top_drawer_place_apple"]
    assert task["per_variant"] is None and "no per-URDF rates" in summary["episode_config"]
    rows = [json.loads(line) for line in (tmp_path / "episodes.jsonl").read_text().splitlines()]
    assert [r["variant"] for r in rows] == ["drawn by the env at reset (seed 5)", "drawn by the env at reset (seed 6)"]
    assert not any(k in r for r in rows for k in ("urdf_version", "overlay", "apple_grid_index"))
