"""Pinned batches and their copy to the device. The config and trainer are imported in the tests that use
them: the ``cuda`` test runs in the GPU check's venv, which holds only torch and the core's few wheels."""

import pytest
import torch

from selfflow.core.data.pinning import batch_to_device, pin_batch, resolve_pin_memory

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


def _nested() -> dict:
    """A batch as the streams make them: collated tensors, per-sample tensors in a list, captions, a tuple."""
    return {"latent": torch.randn(2, 4, 3, 3), "labels": torch.tensor([1, 2]),
            "emb": [torch.ones(3, 5), torch.zeros(0, 5)], "captions": ["a", "b"],
            "pair": (torch.arange(3), 7), "meta": {"ids": torch.tensor([9, 8]), "name": "x"}}


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list | tuple) else ()
    return [t for v in items for t in _tensors(v)]


def _fake_pin(monkeypatch) -> list[torch.Tensor]:
    """Tensor.pin_memory needs CUDA: a copy stands in for it; returns the list of the copies made."""
    pinned: list[torch.Tensor] = []

    def pin(t: torch.Tensor) -> torch.Tensor:
        pinned.append(t.clone())
        return pinned[-1]

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
    return pinned


def test_auto_pins_exactly_on_cuda_and_false_never():
    assert resolve_pin_memory("auto", CUDA) is True
    assert resolve_pin_memory("auto", CPU) is False
    assert resolve_pin_memory(False, CUDA) is False and resolve_pin_memory(False, CPU) is False
    assert resolve_pin_memory(True, CUDA) is True


def test_explicit_true_off_cuda_is_a_one_line_error():
    with pytest.raises(ValueError, match=r"^data\.pin_memory is true but the training device is 'cpu'") as e:
        resolve_pin_memory(True, CPU)
    assert "\n" not in str(e.value)


def test_config_takes_a_bool_or_auto_only():
    from selfflow.core.config import ConfigError, load_config

    assert load_config(None, []).data.pin_memory == "auto"
    assert load_config(None, ["data.pin_memory=false"]).data.pin_memory is False
    with pytest.raises(ConfigError, match=r"data\.pin_memory"):
        load_config(None, ["data.pin_memory=always"])


def test_pin_batch_pins_every_tensor_and_keeps_the_rest(monkeypatch):
    pinned = _fake_pin(monkeypatch)
    batch = _nested()
    out = pin_batch(batch)
    assert len(pinned) == len(_tensors(batch)) == 6
    assert all(any(t is p for p in pinned) for t in _tensors(out))  # every tensor went through pin_memory
    assert all(torch.equal(a, b) for a, b in zip(_tensors(out), _tensors(batch)))
    assert out["captions"] == ["a", "b"] and out["meta"]["name"] == "x" and out["pair"][1] == 7
    assert type(out["emb"]) is list and type(out["pair"]) is tuple


def test_pin_batch_keeps_tensors_already_pinned_or_off_the_host(monkeypatch):
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: pytest.fail("pinned twice"))
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda t: True)
    batch = {"x": torch.ones(2)}
    assert pin_batch(batch)["x"] is batch["x"]
    meta = {"x": torch.ones(2, device="meta")}
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda t: False)
    assert pin_batch(meta)["x"] is meta["x"]


def test_batch_to_device_copies_pinned_tensors_non_blocking(monkeypatch):
    calls: list[tuple[torch.device, bool]] = []
    to = torch.Tensor.to

    def recording_to(t, device, non_blocking=False):
        calls.append((torch.device(device), non_blocking))
        return to(t, device, non_blocking=non_blocking)

    batch = _nested()
    pinned_ids = {id(batch["latent"]), id(batch["emb"][0])}
    monkeypatch.setattr(torch.Tensor, "to", recording_to)
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda t: id(t) in pinned_ids)
    out = batch_to_device(batch, "meta")
    assert all(t.device.type == "meta" for t in _tensors(out))
    assert sorted(nb for _, nb in calls) == [False] * 4 + [True] * 2
    assert out["captions"] == ["a", "b"] and out["pair"][1] == 7


def test_batch_to_device_keeps_tensors_already_there():
    batch = _nested()
    out = batch_to_device(batch, "cpu")
    assert all(a is b for a, b in zip(_tensors(out), _tensors(batch)))


TINY = ["model.hidden_size=32", "model.num_heads=2", "model.depth_double=1", "model.depth_single=2",
        "model.axes_dim=[4,6,6]", "train.batch_size=4", "data.options.image_size=16", "data.options.patch_size=4",
        "sample.steps=2", "sample.num_samples=4", "train.steps=2", "logging.every=1"]


def test_trainer_refuses_explicit_pinning_without_cuda(tmp_path):
    from selfflow.core.config import ConfigError, load_config
    from selfflow.core.trainer import Trainer

    cfg = load_config(None, [*TINY, f"output_dir={tmp_path}", "train.device=cpu", "data.pin_memory=true"])
    with pytest.raises(ConfigError, match=r"data\.pin_memory is true but the training device is 'cpu'"):
        Trainer(cfg, progress=False)


def test_trainer_pins_every_batch_and_trains_on_the_same_numbers(tmp_path, monkeypatch):
    from selfflow.core.config import load_config
    from selfflow.core.metrics import read_metrics
    from selfflow.core.trainer import Trainer

    losses = {}
    for pin in (False, True):
        pinned = _fake_pin(monkeypatch)
        cfg = load_config(None, [*TINY, f"output_dir={tmp_path}", f"name=pin{pin}", "train.device=cpu"])
        trainer = Trainer(cfg, progress=False)
        trainer.pin_memory = pin  # as resolved on CUDA
        trainer.fit()
        assert len(pinned) == (2 * 2 if pin else 0)  # two steps × (media, labels)
        losses[pin] = [r["loss"] for r in read_metrics(tmp_path / f"pin{pin}" / "metrics.jsonl")]
    assert losses[True] == losses[False]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pinned_batch_arrives_on_the_gpu_equal():
    torch.cuda.init()  # is_pinned() reads False before CUDA's lazy init (pytorch#149032)
    batch = _nested()
    pinned = pin_batch(batch)
    # an empty tensor's pinned copy has no memory at all (the host allocator returns nullptr for 0 bytes)
    assert all(t.is_pinned() for t in _tensors(pinned) if t.numel())
    out = batch_to_device(pinned, CUDA)
    torch.cuda.synchronize()
    assert all(t.device == CUDA for t in _tensors(out))
    assert all(torch.equal(a.cpu(), b) for a, b in zip(_tensors(out), _tensors(batch)))
    assert out["captions"] == ["a", "b"] and out["pair"][1] == 7
