import os

import pytest
import torch

from selfflow.core.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)


def test_atomic_save_keep_last_and_latest(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint({"step": step, "w": torch.full((2,), float(step))}, tmp_path, step, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]
    (tmp_path / "step_00000009.pt.tmp").write_bytes(b"partial")  # a write that never finished
    assert latest_checkpoint(tmp_path).name == "step_00000003.pt"
    assert load_checkpoint(latest_checkpoint(tmp_path))["w"].tolist() == [3.0, 3.0]


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"x": Exploit()}, path)
    with pytest.raises(ValueError, match="weights_only"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match=r"nope\.pt"):
        load_checkpoint(tmp_path / "nope.pt")


def test_failed_write_leaves_previous_checkpoint(tmp_path):
    save_checkpoint({"w": torch.ones(1)}, tmp_path, 1)

    class Unsaveable:
        pass

    with pytest.raises((TypeError, AttributeError, RuntimeError)):
        save_checkpoint({"w": Unsaveable()}, tmp_path, 2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]
    assert not list(tmp_path.glob("*.tmp"))


def test_full_disk_keeps_previous_checkpoint_and_says_so(tmp_path, monkeypatch):
    from selfflow.core.checkpoint import CheckpointWriteError

    save_checkpoint({"w": torch.ones(1)}, tmp_path, 1)
    monkeypatch.setenv("SELFFLOW_FAULT_SAVE_ENOSPC", "2")
    with pytest.raises(CheckpointWriteError, match=r"step_00000002\.pt.*No space left.*step_00000001\.pt is intact"):
        save_checkpoint({"w": torch.zeros(1)}, tmp_path, 2, keep_last=1)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]
    assert not list(tmp_path.glob("*.tmp"))
    assert load_checkpoint(tmp_path / "step_00000001.pt")["w"].tolist() == [1.0]
    monkeypatch.delenv("SELFFLOW_FAULT_SAVE_ENOSPC")
    save_checkpoint({"w": torch.zeros(1)}, tmp_path, 2, keep_last=1)  # space again: the next save works
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2]
