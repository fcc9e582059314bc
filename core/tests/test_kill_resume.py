"""SIGKILL a training process mid-run and mid-checkpoint-write; the restart must reproduce the losses of
a run that was never interrupted, and never load a partial checkpoint."""

import os
import signal
import subprocess
import sys
import time

import pytest

from selfflow.core.checkpoint import list_checkpoints
from selfflow.core.metrics import read_metrics

from .test_distributed import assert_same_losses, run_train
from .test_trainer import TINY

ARGS = ("train.steps=12", "checkpoint.every=3", "train.batch_size=2")


def start(tmp_path, name, env=None):
    sets = [a for s in [*TINY, f"output_dir={tmp_path}", f"name={name}", "sample.every=0",
                        "train.num_threads=1", *ARGS] for a in ("--set", s)]
    return subprocess.Popen([sys.executable, "-m", "selfflow.core.cli", "train", "--no-progress", *sets],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def wait_for(predicate, proc, timeout=240):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        if proc.poll() is not None:
            pytest.fail(f"training exited early: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.05)
    pytest.fail("timed out waiting for the training process")


def last_step(path):
    try:
        return read_metrics(path)[-1]["step"]
    except (FileNotFoundError, IndexError, ValueError):
        return 0


def test_sigkill_mid_run_and_mid_checkpoint_write(tmp_path):
    full = run_train(tmp_path, "full", 1, *ARGS)
    ckpts = tmp_path / "killed" / "checkpoints"

    # 1) killed between checkpoints, right after optimizer step 7 (checkpoint 6 is complete): by the fault hook, at
    # that exact step — a kill sent when the test sees step 7 logged could land after checkpoint 9
    proc = start(tmp_path, "killed", env={"SELFFLOW_FAULT_KILL_AT": "7"})
    assert proc.wait(timeout=240) == -signal.SIGKILL
    assert [s for s, _ in list_checkpoints(ckpts)][-1] == 6

    # 2) restarted, then killed while writing checkpoint 9 (the file is held half-written)
    proc = start(tmp_path, "killed", env={"SELFFLOW_FAULT_SAVE_DELAY": "60@9"})
    wait_for(lambda: (ckpts / "step_00000009.pt.tmp").exists(), proc)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert [s for s, _ in list_checkpoints(ckpts)][-1] == 6  # the partial file is never a checkpoint
    assert (ckpts / "step_00000009.pt.tmp").exists()

    # 3) restarted without faults: resumes from 6 and finishes with the uninterrupted losses
    resumed = run_train(tmp_path, "killed", 1, *ARGS)
    assert_same_losses(full, resumed, tol=0)
    assert not list(ckpts.glob("*.tmp"))
