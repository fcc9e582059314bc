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

    monkeypatch.setenv("SELFFLOW_FAULT_SAVE_ENOSPC", "1")  # the first save: nothing earlier to resume from
    with pytest.raises(CheckpointWriteError, match=r"No space left.*No earlier checkpoint exists: free space \(or fix "
                                                   r"the error\) and run the same command again to start the run over"):
        save_checkpoint({"w": torch.ones(1)}, tmp_path, 1)
    monkeypatch.delenv("SELFFLOW_FAULT_SAVE_ENOSPC")
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


def test_nonfinite_state_is_never_written_nor_loaded(tmp_path):
    from selfflow.core.checkpoint import CheckpointLoadError, CheckpointWriteError

    save_checkpoint({"model": {"w": torch.ones(2)}}, tmp_path, 1)
    with pytest.raises(CheckpointWriteError, match=r"step_00000002\.pt: ema\['w'\] holds NaN.*step_00000001\.pt is intact"):
        save_checkpoint({"ema": {"w": torch.tensor([1.0, float("nan")])}}, tmp_path, 2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]
    bad = tmp_path / "bad.pt"
    torch.save({"optimizer": {"state": [{"exp_avg": torch.tensor([float("inf")])}]}}, bad)
    with pytest.raises(CheckpointLoadError, match=r"bad\.pt is not finite: optimizer\['state'\]\[0\]\['exp_avg'\] holds inf"):
        load_checkpoint(bad)


def test_cleanup_on_a_read_only_disk_does_not_hide_the_clean_stop(tmp_path, monkeypatch):
    import errno
    from pathlib import Path

    from selfflow.core import checkpoint
    from selfflow.core.checkpoint import CheckpointWriteError

    save_checkpoint({"w": torch.ones(1)}, tmp_path, 1)

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(args[0]))

    monkeypatch.setattr(checkpoint, "open", read_only, raising=False)
    monkeypatch.setattr(Path, "unlink", read_only)
    with pytest.raises(CheckpointWriteError, match=r"step_00000002\.pt.*Read-only file system.*step_00000001\.pt is intact"):
        save_checkpoint({"w": torch.zeros(1)}, tmp_path, 2)


def test_a_broken_file_is_named_and_the_newest_intact_checkpoint_is_used(tmp_path):
    from selfflow.core.checkpoint import CheckpointLoadError, load_newest_intact

    assert load_newest_intact(tmp_path) is None
    for step in (1, 2):
        save_checkpoint({"w": torch.full((2,), float(step))}, tmp_path, step, keep_last=5)
    good = (tmp_path / "step_00000002.pt").read_bytes()
    (tmp_path / "step_00000003.pt").write_bytes(good[: len(good) // 2])
    (tmp_path / "step_00000004.pt").write_bytes(b"")
    (tmp_path / "step_00000005.pt").mkdir()
    torch.save({"w": torch.tensor([float("nan")])}, tmp_path / "step_00000006.pt")
    path, state, skipped = load_newest_intact(tmp_path)
    assert path.name == "step_00000002.pt" and state["w"].tolist() == [2.0, 2.0]
    reasons = [why for _, why in skipped]
    assert [p.name for p, _ in skipped] == [f"step_0000000{i}.pt" for i in (6, 5, 4, 3)]
    assert "holds NaN" in reasons[0] and "is a directory" in reasons[1]
    assert "empty (0 bytes)" in reasons[2] and "truncated or corrupt" in reasons[3]
    for step in (1, 2):
        (tmp_path / f"step_0000000{step}.pt").unlink()
    with pytest.raises(CheckpointLoadError, match=r"no intact checkpoint in .*step_00000006\.pt.*step_00000003\.pt"):
        load_newest_intact(tmp_path)


def test_weights_files_are_checked(tmp_path):
    from safetensors.torch import save_file

    from selfflow.core.checkpoint import CheckpointLoadError, load_weights

    path = tmp_path / "ema.safetensors"
    save_file({"w": torch.ones(3)}, str(path))
    assert load_weights(path)["w"].tolist() == [1.0, 1.0, 1.0]
    path.write_bytes(b"\xff" * 64)  # a tampered header
    with pytest.raises(CheckpointLoadError, match=r"ema\.safetensors is truncated or corrupt"):
        load_weights(path)
    save_file({"w": torch.tensor([float("nan")])}, str(path))
    with pytest.raises(CheckpointLoadError, match=r"ema\.safetensors is not finite: w holds NaN"):
        load_weights(path)
    with pytest.raises(FileNotFoundError, match=r"nope\.safetensors"):
        load_weights(tmp_path / "nope.safetensors")
