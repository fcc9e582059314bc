import json
import os
import subprocess
import sys

import pytest


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "selfflow.core.cli", *args], capture_output=True, text=True,
                          timeout=240, cwd=cwd, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})


def test_prepare_targets_are_registered(tmp_path):
    r = _cli("prepare", "rt1-fake", "--out", str(tmp_path / "tf"), "--shards", "1", "--episodes", "3")
    assert r.returncode == 0, r.stderr
    r = _cli("prepare", "rt1", "--input", str(tmp_path / "tf"), "--out", str(tmp_path / "out"),
             "--val-fraction", "0")
    assert r.returncode == 0, r.stderr
    assert "3 train / 0 val episodes" in r.stdout and "cut short" not in r.stdout
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["episodes"] == {"train": 3, "val": 0} and (tmp_path / "out" / "stats.json").is_file()
    r = _cli("prepare", "rt1", "--input", str(tmp_path / "missing"), "--out", str(tmp_path / "o2"))
    assert r.returncode != 0 and "no such file or folder: " in r.stderr and "missing" in r.stderr
    (tmp_path / "empty").mkdir()
    r = _cli("prepare", "rt1", "--input", str(tmp_path / "empty"), "--out", str(tmp_path / "o2"))
    assert r.returncode != 0 and "no *.tfrecord* files" in r.stderr
    assert not (tmp_path / "o2").exists()  # a wrong --input leaves no half-made output behind
    r = _cli("prepare", "rt1-fake", "--out", str(tmp_path / "tf0"), "--shards", "0")
    assert r.returncode == 2 and "argument --shards: must be an integer ≥ 1, got '0'" in r.stderr


def test_train_then_roll_out_the_model_in_the_fake_env(tmp_path):
    """`selfflow train --config configs/tiny/rt1.yaml` (3 steps), then `selfflow simpler --run` with the
    trained model on the labelled stand-in: the whole user path, end to end."""
    repo = __file__.rsplit("/robotics/", 1)[0]
    r = _cli("train", "--config", f"{repo}/configs/tiny/rt1.yaml", "--set", "train.steps=3", "--set",
             f"output_dir={tmp_path}", "--set", f"data.options.fake_dir={tmp_path}/data", "--no-progress")
    assert r.returncode == 0, r.stderr
    run = tmp_path / "tiny-rt1"
    assert (run / "ema.safetensors").is_file()
    r = _cli("simpler", "--run", str(run), "--env", "fake", "--task", "move_near", "--limit", "1", "--steps",
             "2", "--device", "cpu", "--out", str(tmp_path / "eval"))
    assert r.returncode == 0, r.stderr
    assert "[env: fake] move_near" in r.stdout
    row = json.loads((tmp_path / "eval" / "episodes.jsonl").read_text().splitlines()[0])
    assert row["length"] == 80 and row["env"] == "fake" and row["max_episode_steps"] == 80
    val = json.loads((tmp_path / "eval" / "validation.json").read_text())
    assert "validation on held-out episodes" in r.stdout and {"action_l1_raw", "gripper_accuracy",
                                                              "val_loss_fm_video"} <= set(val)
    assert val["video"] == "joint"  # the policy mode the metrics were sampled in (--video applies to them too)
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("loss_fm_action" in rec and "loss_fm_video" in rec for rec in logged)


@pytest.mark.distributed
def test_two_torchrun_ranks_generate_the_fake_data_once_and_train(tmp_path):
    """The tiny config's first run under torchrun: every rank generated and converted the fake data into the
    same folder, each (by RANK / WORLD_SIZE) only its share of the shards, so no rank found stats.json and the
    job died before its first step. Rank 0 now makes all of it while the other waits."""
    repo = __file__.rsplit("/robotics/", 1)[0]
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
         "selfflow.core.cli", "train", "--config", f"{repo}/configs/tiny/rt1.yaml", "--no-progress",
         *(a for s in ("train.steps=2", "train.batch_size=4", "sample.every=0", "train.num_threads=1")
           for a in ("--set", s))],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "2 rank(s)" in r.stdout and (tmp_path / "runs/tiny-rt1/checkpoints/step_00000002.pt").is_file()
    data = tmp_path / "runs/rt1-fake-data"  # the config's folder, relative to where the job started
    assert json.loads((data / "manifest.json").read_text())["episodes"] == {"train": 11, "val": 5}


def test_no_validation_episodes_skip_the_metrics_not_the_rollouts(tmp_path, capsys):
    """A data set prepared with --val-fraction 0 (or too few episodes for its fraction) has an empty val/:
    `selfflow simpler` stopped with an error before any rollout."""
    import argparse
    from types import SimpleNamespace

    from selfflow.robotics.cli import _validate

    (tmp_path / "val").mkdir()
    (tmp_path / "manifest.json").write_text(json.dumps({"episodes": {"train": 3, "val": 0}}))
    args = argparse.Namespace(steps=2, seed=0, video="joint", out=str(tmp_path / "eval"))
    assert _validate(None, SimpleNamespace(root=tmp_path), args, "cpu") is None
    assert "holds no validation episodes" in capsys.readouterr().out and not (tmp_path / "eval").exists()


def test_a_class_conditioned_run_is_refused_before_tasks_it_cannot_read(fake_data_dir):
    """The fake instructions hold the drawer task's two but not Move Near's: `selfflow simpler` stopped with a
    ValueError at Move Near's first episode; it now refuses before any rollout, naming the instruction."""
    import pytest

    from selfflow.core.config import ConfigError
    from selfflow.robotics.cli import check_instructions
    from selfflow.robotics.modality import RT1Modality

    m = RT1Modality({"dataset": "fake", "fake_dir": str(fake_data_dir), "conditioning": "class"})
    check_instructions(m, ["open_top_drawer_place_apple"])
    with pytest.raises(ConfigError, match=r"class-conditioned .*'move blue plastic bottle near pepsi can'.*--task"):
        check_instructions(m, ["move_near", "open_top_drawer_place_apple"])
    check_instructions(RT1Modality({"dataset": "fake", "fake_dir": str(fake_data_dir)}), ["move_near"])  # text
