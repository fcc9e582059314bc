import pytest
import torch
import yaml

from selfflow.core.checkpoint import CheckpointWriteError
from selfflow.core.checkpointer import (
    Checkpointer,
    GeneratorState,
    ModelState,
    OptimizerState,
    StreamsState,
)
from selfflow.core.config import ConfigError, load_config
from selfflow.core.distributed import DistInfo


class Counter:
    def __init__(self, n=0):
        self.n = n

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.n = state["n"]


def _pieces(seed):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    gen = torch.Generator().manual_seed(seed)
    streams = {"image": Counter(seed), "audio": Counter(seed + 1)}
    return model, opt, gen, streams


def _checkpointer(tmp_path, pieces, **sets):
    model, opt, gen, streams = pieces
    cfg = load_config(None, [f"output_dir={tmp_path}", "name=run", *(f"checkpoint.{k}={v}" for k, v in sets.items())])
    return Checkpointer(cfg, DistInfo(), {"model": ModelState(model), "optimizer": OptimizerState(model, opt),
                                          "generator": GeneratorState(gen), "streams": StreamsState(streams)})


def test_state_round_trips_through_a_checkpoint(tmp_path):
    src, dst = _pieces(1), _pieces(2)
    path = _checkpointer(tmp_path, src).save(7)
    assert path.name == "step_00000007.pt"
    stored = torch.load(path, weights_only=True)
    assert set(stored) == {"model", "optimizer", "generator", "streams", "config"}
    assert yaml.safe_load(stored["config"])["name"] == "run"
    assert _checkpointer(tmp_path, dst).resume() == path
    assert torch.equal(src[0].weight, dst[0].weight)
    assert torch.equal(src[2].get_state(), dst[2].get_state())
    assert dst[3]["audio"].n == 2
    assert torch.equal(src[1].state_dict()["state"][0]["exp_avg"], dst[1].state_dict()["state"][0]["exp_avg"])


def test_a_changed_mixture_is_named(tmp_path):
    _checkpointer(tmp_path, _pieces(1)).save(1)
    model, opt, gen, _ = _pieces(2)
    with pytest.raises(ConfigError, match=r"no data position for \['video'\]"):
        _checkpointer(tmp_path, (model, opt, gen, {"video": Counter()})).resume()


def test_due_keep_last_and_a_failed_write(tmp_path, monkeypatch):
    ckpt = _checkpointer(tmp_path, _pieces(1), every=3, keep_last=1)
    assert [s for s in range(1, 10) if ckpt.due(s, total=9)] == [3, 6]  # the last one is the caller's
    ckpt.save(3)
    ckpt.save(6)
    assert [p.name for p in ckpt.dir.iterdir()] == ["step_00000006.pt"]
    monkeypatch.setenv("SELFFLOW_FAULT_SAVE_ENOSPC", "9")
    with pytest.raises(CheckpointWriteError, match=r"step_00000006\.pt is intact"):
        ckpt.save(9)


def test_export_ema_writes_safetensors_with_the_model_config(tmp_path):
    from safetensors import safe_open

    model = torch.nn.Linear(3, 2)
    cfg = load_config(None, [f"output_dir={tmp_path}", "name=run"])
    path = _checkpointer(tmp_path, _pieces(1)).export_ema(model, cfg.model)
    with safe_open(str(path), "pt") as f:
        assert torch.equal(f.get_tensor("weight"), model.weight)
        assert '"hidden_size"' in f.metadata()["model_config"]
