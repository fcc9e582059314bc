import subprocess
import sys

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
    assert stored["generator"]["device"] == "cpu"
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
    monkeypatch.delenv("SELFFLOW_FAULT_SAVE_ENOSPC")
    monkeypatch.setenv("SELFFLOW_FAULT_SAVE_ERROR", "9")  # not a write error: a failure gathering the state
    with pytest.raises(CheckpointWriteError, match=r"cannot write checkpoint .*step_00000009\.pt: rank 0 failed: "
                                                   r"ValueError: injected fault .*step_00000006\.pt is intact"):
        ckpt.save(9)
    assert [p.name for p in ckpt.dir.iterdir()] == ["step_00000006.pt"]


def test_export_ema_writes_safetensors_with_the_model_config(tmp_path):
    from safetensors import safe_open

    model = torch.nn.Linear(3, 2)
    cfg = load_config(None, [f"output_dir={tmp_path}", "name=run"])
    path = _checkpointer(tmp_path, _pieces(1)).export_ema(model, cfg.model)
    with safe_open(str(path), "pt") as f:
        assert torch.equal(f.get_tensor("weight"), model.weight)
        assert '"hidden_size"' in f.metadata()["model_config"]


def test_resume_skips_a_broken_newest_checkpoint_names_it_and_moves_it_aside(tmp_path, caplog):
    src = _pieces(1)
    first = _checkpointer(tmp_path, src, keep_last=5).save(1)
    broken = first.with_name("step_00000002.pt")
    broken.write_bytes(first.read_bytes()[:100])  # truncated
    dst = _pieces(2)
    with caplog.at_level("WARNING", logger="selfflow.checkpoint"):
        assert _checkpointer(tmp_path, dst).resume() == first
    assert torch.equal(src[0].weight, dst[0].weight)
    assert "step_00000002.pt is truncated or corrupt" in caplog.text and "moved to step_00000002.pt.corrupt" in caplog.text
    assert not broken.exists() and broken.with_name("step_00000002.pt.corrupt").exists()


def test_a_generator_state_from_another_device_kind_seeds_the_generator(caplog):
    """A CUDA checkpoint's Philox state (16 bytes) on a CPU run, or the reverse: set_state refused it, so a run
    begun on a GPU could not continue on a laptop. Now it seeds the generator from the saved state, and says so."""
    philox = {"state": torch.arange(16, dtype=torch.uint8), "device": "cuda"}
    draws = []
    for state in (philox, philox, {"state": philox["state"] + 1, "device": "cuda"}):
        gen = torch.Generator().manual_seed(0)
        GeneratorState(gen).load_state_dict(state)
        draws.append(torch.rand(3, generator=gen))
    assert torch.equal(draws[0], draws[1])  # deterministic: a resume of the resume draws the same
    assert not torch.equal(draws[0], draws[2])  # another checkpoint, another seed
    assert not torch.equal(draws[0], torch.rand(3, generator=torch.Generator().manual_seed(0)))
    assert "generator ran on cuda and this run's runs on cpu: it is seeded from the saved state" in caplog.text
    # a checkpoint written before the device was recorded: the state's size tells its kind
    gen, old = torch.Generator().manual_seed(5), {"state": torch.Generator().manual_seed(3).get_state()}
    caplog.clear()
    GeneratorState(gen).load_state_dict(old)
    assert torch.equal(gen.get_state(), old["state"]) and not caplog.text
    GeneratorState(gen).load_state_dict({"state": philox["state"]})
    assert "ran on another kind of device and this run's runs on cpu" in caplog.text


def test_resume_refuses_a_default_that_changed_in_the_code(tmp_path):
    """The same config, resolved otherwise (a plug-in's γ or data seed default changed): it used to resume
    silently, training another objective or data stream from there."""
    model = _pieces(1)[0]
    cfg = load_config(None, [f"output_dir={tmp_path}", "name=run"])

    def checkpointer(gamma, seed):
        return Checkpointer(cfg, DistInfo(), {"model": ModelState(model)}, objectives={"image": {"gamma": gamma}},
                            data_options={"image": {"seed": seed, "size": 16}})

    checkpointer(0.5, 0).save(1)
    assert checkpointer(0.5, 0).resume().name == "step_00000001.pt"
    with pytest.raises(ConfigError, match=r"settings the config leaves at their defaults resolve otherwise than when "
                                          r"it was trained .*: image: objective\.gamma \(checkpoint 0\.5, now 0\.6\); "
                                          r"image: data\.options\.seed \(checkpoint 0, now 1\)"):
        checkpointer(0.6, 1).resume()
    old = Checkpointer(cfg, DistInfo(), {"model": ModelState(model)})  # a checkpoint from before they were kept
    old.save(2)
    assert checkpointer(0.6, 1).resume().name == "step_00000002.pt"


def test_resume_refuses_nonfinite_weights_and_a_state_that_does_not_fit(tmp_path):
    from selfflow.core.checkpoint import CheckpointLoadError

    model, opt, gen, streams = _pieces(1)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    state = _checkpointer(tmp_path, (model, opt, gen, streams)).state_dict()
    path = tmp_path / "run" / "checkpoints" / "step_00000001.pt"
    path.parent.mkdir(parents=True)
    torch.save(state, path)  # written behind the checkpointer's back (it refuses non-finite state)
    with pytest.raises(CheckpointLoadError, match=r"step_00000001\.pt is not finite: model\['weight'\] holds NaN"):
        _checkpointer(tmp_path, _pieces(2)).resume()
    path.unlink()
    _checkpointer(tmp_path, _pieces(1)).save(1)
    wide = torch.nn.Linear(4, 2)
    other = (wide, torch.optim.AdamW(wide.parameters()), torch.Generator(), _pieces(1)[3])
    with pytest.raises(CheckpointLoadError, match=r"cannot resume from .*step_00000001\.pt: its model state does not fit"):
        _checkpointer(tmp_path, other).resume()


def test_resume_refuses_a_changed_model_objective_or_data_config(tmp_path):
    def ckpt(*sets):
        model, _, _, streams = _pieces(1)
        cfg = load_config(None, [f"output_dir={tmp_path}", "name=run", *sets])
        return Checkpointer(cfg, DistInfo(), {"model": ModelState(model), "streams": StreamsState(streams)})

    ckpt("model.depth_single=2").save(1)
    assert ckpt("model.depth_single=2", "train.steps=9", "logging.every=3", "checkpoint.every=2").resume()
    with pytest.raises(ConfigError, match=r"model\.depth_single \(checkpoint 2, now 3\)"):
        ckpt("model.depth_single=3").resume()
    with pytest.raises(ConfigError, match=r"data\.options\.image_size \(checkpoint \(unset\), now 8\).*--no-resume"):
        ckpt("model.depth_single=2", "data.options.image_size=8").resume()


def test_a_nonfinite_ema_is_never_exported(tmp_path):
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.bias.fill_(float("inf"))
    cfg = load_config(None, [f"output_dir={tmp_path}", "name=run"])
    with pytest.raises(CheckpointWriteError, match=r"refusing to export .*ema\.safetensors.*bias holds inf"):
        _checkpointer(tmp_path, _pieces(1)).export_ema(model, cfg.model)
    assert not (tmp_path / "run" / "ema.safetensors").exists()


# One rank of a 2-rank gloo group saving step 5, where one rank fails with an error that is not a write error:
# gathering its state ("gather", rank 0; "gather@1", rank 1) or serialising it ("pickle", rank 0).
_SAVE_ON_TWO_RANKS = """
import datetime, sys
import torch.distributed as dist
from selfflow.core.checkpointer import Checkpointer
from selfflow.core.config import load_config
from selfflow.core.distributed import DistInfo, destroy

rank, init_file, out, fault = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]

class Part:
    def state_dict(self):
        if fault == ("gather" if rank == 0 else "gather@1"):
            raise TypeError("a component cannot give its state")
        return {"x": (lambda: 0) if rank == 0 and fault == "pickle" else 1}  # a lambda cannot be saved

dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                        timeout=datetime.timedelta(seconds=30))
try:
    ckpt = Checkpointer(load_config(None, [f"output_dir={out}", "name=run"]), DistInfo(rank, 2), {"part": Part()})
    try:
        ckpt.save(5)
        print("saved")
    except Exception as e:
        print(f"raised {type(e).__name__}: {e}")
finally:
    destroy()  # as the CLI does: a barrier, then the group is torn down
"""


@pytest.mark.distributed
@pytest.mark.timeout(120)
@pytest.mark.parametrize("fault", ["gather", "pickle", "gather@1"])
def test_any_failure_while_saving_on_one_rank_stops_every_rank(tmp_path, fault):
    """One rank fails gathering or serialising the state (not a write error): both ranks raise the same
    error naming the checkpoint and that rank, none waits forever in the next collective, and nothing is
    written — every rank's share (its data positions) belongs in the checkpoint."""
    procs = [subprocess.Popen([sys.executable, "-c", _SAVE_ON_TWO_RANKS, str(rank), str(tmp_path / "init"),
                               str(tmp_path), fault], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    try:
        outputs = [p.communicate(timeout=90) for p in procs]
    finally:
        for p in procs:
            p.kill()
    lines = [out.strip().splitlines()[-1] if out.strip() else err[-2000:] for out, err in outputs]
    path = tmp_path / "run" / "checkpoints" / "step_00000005.pt"
    failed = 1 if fault == "gather@1" else 0
    expected = f"raised CheckpointWriteError: cannot write checkpoint {path}: rank {failed} failed"
    assert all(line.startswith(expected) for line in lines), lines
    assert not path.exists()


def test_each_rank_resumes_its_own_data_position(tmp_path, caplog):
    """A checkpoint keeps every rank's data position (``streams``: ``per_rank``); a rank loads its own, or rank
    0's on another number of ranks (the stream decides whether it can split it otherwise); a checkpoint from
    before (one position) loads as it is."""
    pieces = _pieces(1)
    _checkpointer(tmp_path, pieces).save(1)
    path = tmp_path / "run" / "checkpoints" / "step_00000001.pt"
    state = torch.load(path, weights_only=True)
    assert state["streams"] == {"per_rank": [{"image": {"n": 1}, "audio": {"n": 2}}]}
    state["streams"] = {"per_rank": [{"image": {"n": 5}, "audio": {"n": 6}}, {"image": {"n": 7}, "audio": {"n": 8}}]}
    for rank, world, image in ((1, 2, 7), (0, 2, 5), (0, 1, 5), (2, 4, 5)):
        model, opt, gen, streams = _pieces(2)
        Checkpointer(load_config(None, [f"output_dir={tmp_path}", "name=run"]), DistInfo(rank, world), {
            "model": ModelState(model), "optimizer": OptimizerState(model, opt), "generator": GeneratorState(gen),
            "streams": StreamsState(streams)}).load_state_dict(state)
        assert streams["image"].n == image, (rank, world)
    assert "before every rank's data position was kept" not in caplog.text
    state["streams"] = {"image": {"n": 3}, "audio": {"n": 4}}  # one position: a checkpoint from before
    for world in (1, 2):
        model, opt, gen, streams = _pieces(2)
        Checkpointer(load_config(None, [f"output_dir={tmp_path}", "name=run"]), DistInfo(0, world), {
            "model": ModelState(model), "optimizer": OptimizerState(model, opt), "generator": GeneratorState(gen),
            "streams": StreamsState(streams)}).load_state_dict(state)
        assert streams["image"].n == 3
        # on several ranks, said once (rank 0): the other ranks resume at rank 0's position
        assert ("before every rank's data position was kept" in caplog.text) == (world == 2)


def test_with_resplit_a_shard_stream_split_otherwise_goes_on_and_others_load_as_before(tmp_path):
    """``StreamsState(resplit=True)`` (``selfflow train --resplit-data``) hands a shard stream every rank's stored
    position when its split changed, and loads the exact position when it did not; a stream that cannot resplit
    (here a counter) loads this rank's or rank 0's position as without it. Without it the change is refused."""
    import numpy as np

    from selfflow.core.checkpoint import CheckpointLoadError
    from selfflow.core.data.shard_format import shard_urls
    from selfflow.core.data.shard_stream import ShardStream
    from selfflow.core.data.shard_writer import write_shards

    write_shards(list(range(12)), lambda i: {"latent": np.full((2, 3), float(i), dtype=np.float32),
                                             "caption": f"item {i}", "label": 0}, tmp_path / "data", shard_size=3)
    urls = shard_urls(tmp_path / "data")
    ranks = []
    for rank in range(2):
        stream = ShardStream(urls, 2, rank=rank, world_size=2)
        next(iter(stream))
        ranks.append({"shards": stream.state_dict(), "counter": {"n": 10 + rank}})
    state = {"streams": {"per_rank": ranks}}
    cfg = load_config(None, [f"output_dir={tmp_path}", "name=run"])

    def load(rank, world, batch, resplit):
        streams = {"shards": ShardStream(urls, batch, rank=rank, world_size=world), "counter": Counter()}
        Checkpointer(cfg, DistInfo(rank, world), {"streams": StreamsState(streams, resplit=resplit)}).load_state_dict(
            state)
        return streams

    exact = load(1, 2, 2, resplit=True)  # the same split: the exact position, as without resplit
    assert (exact["shards"].epoch, exact["shards"].consumed, exact["counter"].n) == (0, ranks[1]["shards"]["consumed"],
                                                                                   11)
    one = load(0, 1, 3, resplit=True)  # one rank, another batch: from the next epoch; the counter takes rank 0's
    assert (one["shards"].epoch, one["shards"].consumed, one["counter"].n) == (1, 0, 10)
    with pytest.raises(CheckpointLoadError, match=r"split otherwise.*--resplit-data"):
        load(0, 1, 3, resplit=False)
