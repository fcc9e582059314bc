"""The public Python API (``selfflow.core.load``) and ``selfflow export``, including the README's example."""

import re
from pathlib import Path

import pytest
import torch

from selfflow.core import Sampler, load
from selfflow.core.cli import main
from selfflow.core.config import ConfigError, load_config
from selfflow.core.trainer import Trainer

from .test_pretrained import make_run_dir

README = Path(__file__).resolve().parents[2] / "README.md"
TEXT = "text: {kind: tiny, dim: 16}"
MIXED = (f"[{{modality: image, batch_size: 2, options: {{image_size: 16, patch_size: 4, conditioning: text, {TEXT}}}}}, "
         f"{{modality: video, batch_size: 2, options: {{frames: 4, image_size: 16, patch: [2, 4, 4], conditioning: text, "
         f"{TEXT}}}}}]")


def _readme_example() -> str:
    section = README.read_text().split("## Use a trained model in Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_runs_on_a_tiny_trained_mixed_run(tmp_path, monkeypatch):
    cfg = load_config(None, [
        "model.hidden_size=32", "model.num_heads=2", "model.depth_double=1", "model.depth_single=1",
        "model.axes_dim=[4,6,6]", "train.steps=2", "sample.steps=2", "sample.num_samples=2", "checkpoint.every=0",
        "train.num_threads=1", f"output_dir={tmp_path / 'runs'}", "name=tiny-mixed", f"data.mixture={MIXED}"])
    Trainer(cfg, progress=False).fit()
    assert (cfg.run_dir / "pretrained" / "config.json").is_file()
    monkeypatch.chdir(tmp_path)
    example = _readme_example()
    namespace: dict = {}
    exec(example, namespace)  # the README's own code
    assert namespace["videos"].shape[0] == 2 and (tmp_path / "my_videos.mp4").is_file()
    from_export = load(cfg.run_dir / "pretrained", modality="video", device="cpu")
    again = from_export.sample(prompts=["a red circle moving left", "a blue square moving up"], steps=20,
                               cfg_scale=3.0, seed=0)
    assert torch.equal(again, namespace["videos"])


def test_sample_takes_labels_or_prompts_as_the_run_allows(tmp_path):
    run_dir, _ = make_run_dir(tmp_path)
    model = load(str(run_dir), device="cpu")
    assert isinstance(model, Sampler)
    media = model.sample(labels=[1, 2, 3], steps=1, seed=5)
    assert media.shape == (3, 3, 16, 16) and torch.equal(media, model.sample(labels=[1, 2, 3], steps=1, seed=5))
    assert model.sample(n=2, steps=1).shape[0] == 2
    with pytest.raises(ConfigError, match="prompts need a text-conditioned run"):
        model.sample(prompts="a cat", steps=1)
    assert model.save(media, tmp_path / "grid").suffix == ".png"
    saved = model.save_pretrained(tmp_path / "pre")
    assert torch.equal(load(saved, device="cpu").sample(labels=[1], steps=1, seed=5), media[:1])


def test_sample_checks_its_arguments_and_returns_ordinary_tensors(tmp_path):
    run_dir, _ = make_run_dir(tmp_path)
    model = load(run_dir, device="cpu")
    media = model.sample(labels=3, steps=1)  # one label: an int is enough (it was a TypeError)
    media.mul_(0.5)  # an ordinary tensor: inference-mode tensors refused in-place edits and autograd
    assert media.shape[0] == 1 and not media.is_inference()
    for bad, says in (({"n": 0}, r"n must be an integer ≥ 1, got 0"),  # 0 used to mean "the default"
                      ({"n": 2.5}, r"n must be an integer ≥ 1, got 2\.5"),
                      ({"seed": -1}, r"seed must be an integer ≥ 0, got -1"),
                      ({"labels": torch.tensor([1.7, 2.2])}, r"class labels must be integers, got torch\.float32"),
                      ({"labels": []}, r"the class label list is empty")):
        with pytest.raises(ConfigError, match=says):
            model.sample(steps=1, **bad)


def test_save_captions_a_grid_as_the_cli_does(tmp_path):
    from PIL import Image

    run_dir, _ = make_run_dir(tmp_path)
    model = load(run_dir, device="cpu")
    media = model.sample(labels=[1, 2], steps=1)
    labelled = model.save(media, tmp_path / "labelled", labels=[1, 2])
    plain = model.save(media, tmp_path / "plain")
    assert Image.open(labelled).size != Image.open(plain).size  # class names under the columns
    text_dir, _ = make_run_dir(tmp_path, "data.options.conditioning=text", "data.options.text={kind: tiny, dim: 16}",
                               name="text")
    text = load(text_dir, device="cpu")
    grid = text.save(text.sample(prompts=["a", "b"], n=3, steps=1), tmp_path / "t", prompts=["a", "b"])
    assert (tmp_path / "t.prompts.txt").read_text().splitlines() == ["a", "b", "a"] and grid.suffix == ".png"


def test_export_writes_a_pretrained_dir_and_pushes_only_when_asked(tmp_path, monkeypatch, capsys):
    run_dir, _ = make_run_dir(tmp_path)
    out = tmp_path / "exported"
    assert main(["export", "--run", str(run_dir), "--out", str(out)]) == 0
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()

    calls = []

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kw):
            calls.append(("create", repo_id, kw["exist_ok"]))

        def upload_folder(self, folder_path, repo_id, **kw):
            calls.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))
            return "https://hub.invalid/commit/1"

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    fresh = tmp_path / "fresh"
    assert main(["export", "--run", str(run_dir), "--out", str(fresh), "--push-to-hub", "me/tiny"]) == 2
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err and not calls
    assert not fresh.exists()  # refused before the export, not after writing it
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    assert main(["export", "--run", str(run_dir), "--out", str(out), "--push-to-hub", "me/tiny"]) == 0
    assert calls == [("create", "me/tiny", True), ("upload", "me/tiny", ["config.json", "model.safetensors"])]
    assert "pushed to https://hub.invalid/commit/1" in capsys.readouterr().out
