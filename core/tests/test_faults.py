"""Fault hooks and clean stops: NaN batches are skipped, repeated ones stop the run, and the CLI reports a
stop without a traceback (the bad-data policy: test_step_guard.py)."""

import subprocess
import sys

import pytest
import torch

from selfflow.core.faults import kill_point, poison_batches, save_error
from selfflow.core.step_guard import NonFiniteLossError
from selfflow.core.trainer import Trainer

from .test_trainer import _cfg


def test_hooks_are_inert_without_their_variables(tmp_path, monkeypatch):
    batch = {"media": torch.ones(2), "labels": torch.tensor([1, 2])}
    assert poison_batches([batch], 3)[0] is batch
    monkeypatch.setenv("SELFFLOW_FAULT_NAN_AT", "3,5")
    poisoned = poison_batches([batch], 3)[0]
    assert poisoned["media"].isnan().all() and poisoned["labels"].tolist() == [1, 2]
    assert poison_batches([batch], 4)[0] is batch
    monkeypatch.setenv("SELFFLOW_FAULT_KILL_AT", "7@1")
    kill_point(7, 0, tmp_path)  # another rank: no kill
    (tmp_path / ".fault_killed_7_1").touch()
    kill_point(7, 1, tmp_path)  # already fired once for this run directory: no kill
    save_error(4, 0)
    monkeypatch.setenv("SELFFLOW_FAULT_SAVE_ERROR", "4@1")
    save_error(4, 0)  # another rank
    save_error(5, 1)  # another step
    with pytest.raises(ValueError, match=r"injected fault \(SELFFLOW_FAULT_SAVE_ERROR=4@1\).*step 4"):
        save_error(4, 1)


def test_nan_batches_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFFLOW_FAULT_NAN_AT", "2")
    trainer = Trainer(_cfg(tmp_path, "nan1", "train.steps=3"), progress=False)
    trainer.fit()
    assert trainer.guard.skipped_steps == 1 and trainer.step == 3
    monkeypatch.setenv("SELFFLOW_FAULT_NAN_AT", "2,3,4")
    trainer = Trainer(_cfg(tmp_path, "nan3", "train.steps=6", "train.max_nonfinite_steps=3"), progress=False)
    with pytest.raises(NonFiniteLossError, match="3 optimizer steps in a row"):
        trainer.fit()


def test_cli_reports_a_stop_without_traceback(tmp_path):
    sets = [a for s in ["model.preset=tiny", "data.options.image_size=16", "train.batch_size=2",
                        "train.steps=4", "train.max_nonfinite_steps=2", f"output_dir={tmp_path}", "name=stop"]
            for a in ("--set", s)]
    proc = subprocess.run([sys.executable, "-m", "selfflow.core.cli", "train", "--no-progress", *sets],
                          capture_output=True, text=True, timeout=300,
                          env={"SELFFLOW_FAULT_NAN_AT": "1,2", "OMP_NUM_THREADS": "1", "PATH": ""})
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "selfflow: stopped: 2 optimizer steps in a row" in proc.stderr and "Traceback" not in proc.stderr


def test_a_kill_list_fires_each_entry_once_per_run_directory(tmp_path, monkeypatch):
    """``STEP@RANK,STEP@RANK``: one run killed twice (a torchrun group restarted twice); a restarted process
    that passes a step again does not die there again."""
    import signal

    from selfflow.core import faults

    sent = []
    monkeypatch.setattr(faults.os, "kill", lambda pid, sig: sent.append(sig))
    monkeypatch.setenv("SELFFLOW_FAULT_KILL_AT", "6@1, 11")
    for step, rank in [(6, 0), (6, 1), (6, 1), (11, 1), (11, 0), (11, 0), (7, 1)]:
        kill_point(step, rank, tmp_path)
    assert sent == [signal.SIGKILL, signal.SIGKILL]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".fault_killed_11_0", ".fault_killed_6_1"]
    monkeypatch.setenv("SELFFLOW_FAULT_KILL_AT", "")
    monkeypatch.setenv("SELFFLOW_FAULT_SIGNAL_AT", "2@0:SIGUSR1,3@0")
    kill_point(2, 0, tmp_path / "r")
    kill_point(3, 0, tmp_path / "r")
    assert sent[2:] == [signal.SIGUSR1, signal.SIGTERM]
