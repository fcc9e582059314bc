"""The options every media ``selfflow prepare`` target shares: under torchrun, ``--device cuda`` is the rank's GPU."""

import importlib

import pytest

from selfflow.core.data.prepare_options import print_report, rank_device


def test_cuda_is_the_local_ranks_gpu(monkeypatch):
    assert rank_device("cuda") == "cuda" and rank_device("cpu") == "cpu"
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert rank_device("cuda") == "cuda:3" and rank_device("cpu") == "cpu" and rank_device("cuda:1") == "cuda:1"


def test_auto_is_the_ranks_gpu_when_there_is_one(monkeypatch):
    """The CLI's default: `prepare video` on a GPU machine used to encode on the CPU unless told."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert rank_device("auto") == "cpu"
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    assert rank_device("auto") == "cuda"
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert rank_device("auto") == "cuda:3"


class _Placed(Exception):
    pass


@pytest.mark.parametrize(("module", "function", "codec"), [
    ("selfflow.video.prepare", "prepare_video", "selfflow.video.wan_codec.WanCodec"),
    ("selfflow.audio.prepare", "prepare_audio", "selfflow.audio.oobleck_codec.OobleckCodec")])
def test_video_and_audio_prepare_put_each_rank_on_its_gpu(module, function, codec, monkeypatch, tmp_path):
    """All eight ranks of `torchrun … prepare video --device cuda` once loaded the VAE onto GPU 0."""
    mod_name, cls_name = codec.rsplit(".", 1)

    class Codec:
        def to(self, device):
            raise _Placed(device)

    monkeypatch.setattr(importlib.import_module(mod_name), cls_name,
                        type(cls_name, (), {"from_pretrained": staticmethod(lambda *a, **k: Codec())}))
    monkeypatch.setenv("LOCAL_RANK", "2")
    for name in ("a.mp4", "a.wav"):
        (tmp_path / name).write_bytes(b"")  # listed by suffix; never read here
    prepare = getattr(importlib.import_module(module), function)
    with pytest.raises(_Placed, match="cuda:2"):
        prepare({"input": str(tmp_path), "out": str(tmp_path / "out"), "vae_dir": str(tmp_path), "device": "cuda"})


@pytest.mark.parametrize(("module", "function"), [("selfflow.video.prepare", "prepare_video"),
                                                  ("selfflow.audio.prepare", "prepare_audio"),
                                                  ("selfflow.image.prepare_image_text", "prepare_image_text")])
def test_a_wrong_input_fails_before_the_autoencoder_loads(module, function, tmp_path):
    """A typo in --input used to be reported only after a multi-GB autoencoder had loaded (here: no
    autoencoder exists at all, and the error is still about the input)."""
    prepare = getattr(importlib.import_module(module), function)
    opts = {"out": str(tmp_path / "out"), "vae_dir": str(tmp_path / "no-vae"), "device": "cpu"}
    with pytest.raises(FileNotFoundError, match=r"prepare input .*typo is neither a directory"):
        prepare({**opts, "input": str(tmp_path / "typo")})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"prepare input .*empty holds no media"):
        prepare({**opts, "input": str(tmp_path / "empty")})


def test_each_rank_says_its_report_is_its_part(monkeypatch, capsys):
    """The ranks of a torchrun preparation share no process group: N lines of partial counts, each saying so."""
    report = {"written": 4, "shards": 2, "existing": 0, "skipped": 1}
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    print_report("video", report)
    assert capsys.readouterr().out.startswith("prepare video: 4 samples in 2 new shard(s)")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    print_report("video", report)
    assert capsys.readouterr().out.startswith("prepare video (rank 1 of 2: its shards only): 4 samples")
