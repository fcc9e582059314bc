"""A modality from a package outside core (examples/plugins/sine_waves_modality.py), found through the
``selfflow.modalities`` entry points: trained, resumed, sampled, exported and loaded like a built-in one."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from selfflow.core import load, registry
from selfflow.core.cli import main

PLUGINS = Path(__file__).resolve().parents[2] / "examples" / "plugins"
MODEL = ["model.hidden_size=32", "model.num_heads=2", "model.depth_double=1", "model.depth_single=2",
         "model.axes_dim=[4,6,6]"]


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """A distribution that advertises the example, as `pip install` would leave it."""
    dist = tmp_path / "site" / "sine_waves_modality-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: sine-waves-modality\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[selfflow.modalities]\nsine_waves = sine_waves_modality:SineWaves\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.syspath_prepend(str(PLUGINS))
    monkeypatch.setattr(registry, "_MODALITIES", dict(registry._MODALITIES))
    monkeypatch.delitem(sys.modules, "sine_waves_modality", raising=False)


def _train(tmp_path, steps: int) -> int:
    sets = [*MODEL, "data.modality=sine_waves", "data.options={length: 32, patch: 4}", "train.batch_size=4",
            f"train.steps={steps}", "checkpoint.every=2", "sample.steps=2", "sample.num_samples=4",
            f"output_dir={tmp_path}", "name=waves"]
    return main(["train", "--no-progress", *[a for s in sets for a in ("--set", s)]])


def test_the_example_modality_trains_resumes_samples_and_exports(installed, tmp_path, capsys):
    assert "sine_waves" in registry.available_modalities()
    assert _train(tmp_path, 2) == 0 and _train(tmp_path, 4) == 0  # the second resumes at step 2
    run = tmp_path / "waves"
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4] and (run / "samples" / "step_00000004.png").is_file()

    out = tmp_path / "many"
    assert main(["sample", "--run", str(run), "--num", "3", "--steps", "2", "--out-dir", str(out), "--no-progress",
                 "--device", "cpu"]) == 0
    assert np.load(out / "000002.npy").shape == (2, 32)
    assert "selfflow eval" not in capsys.readouterr().out  # no evaluation command suits it: none suggested

    assert main(["export", "--run", str(run), "--out", str(tmp_path / "export")]) == 0
    model = load(tmp_path / "export", device="cpu")
    waves = model.sample(labels=[0, 3], steps=2, seed=1)
    assert waves.shape == (2, 2, 32) and model.modality.class_names[3] == "5 Hz"
    k = model.modality.num_classes  # the contract's default preview conditioning, by sample index: i mod k
    cond, null, shown = model.modality.sample_conditions(torch.tensor([k + 1, 0]), "cpu")
    assert cond.labels.tolist() == shown.tolist() == [1, 0] and null.labels.tolist() == [k, k]
    assert torch.equal(waves, load(run, device="cpu").sample(labels=[0, 3], steps=2, seed=1))
    assert model.save(waves, tmp_path / "grid", labels=[0, 3]).suffix == ".png"


def test_the_example_modality_refuses_bad_options_and_the_2d_dit(installed, tmp_path):
    from selfflow.core.config import ConfigError, load_config
    from selfflow.core.run_setup import build_run

    with pytest.raises(ConfigError, match=r"data\.options\.patch=5 must divide data\.options\.length=32"):
        build_run(load_config(None, ["data.modality=sine_waves", "data.options={length: 32, patch: 5}"]))
    with pytest.raises(ConfigError, match=r"modality 'sine_waves' places its tokens along a time axis"):
        build_run(load_config(None, ["data.modality=sine_waves", "model={arch: dit, preset: tiny}"]))


def test_an_error_raised_in_plug_in_code_is_located(installed, tmp_path, monkeypatch, capsys):
    """A ``KeyError: 'label'`` from a plug-in's ``encode`` read ``selfflow: error: label``: the line now says what
    was raised, and where, in the plug-in."""
    (tmp_path / "site" / "typo_waves.py").write_text(
        "from sine_waves_modality import SineWaves\n\n\n"
        "class TypoWaves(SineWaves):\n"
        "    name = 'typo_waves'\n\n"
        "    def encode(self, batch, device):\n"
        "        batch['label']  # the stream's key is 'labels'\n")
    entry_points = tmp_path / "site" / "sine_waves_modality-0.1.dist-info" / "entry_points.txt"
    entry_points.write_text(entry_points.read_text() + "typo_waves = typo_waves:TypoWaves\n")
    monkeypatch.delenv("SELFFLOW_TRACEBACK", raising=False)
    sets = [*MODEL, "data.modality=typo_waves", "data.options={length: 32, patch: 4}", "train.batch_size=4",
            "train.steps=1", f"output_dir={tmp_path}", "name=typo"]
    assert main(["train", "--no-progress", *[a for s in sets for a in ("--set", s)]]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("selfflow: error: KeyError: 'label' (in plug-in code at ")
    assert err.endswith(f"{tmp_path / 'site' / 'typo_waves.py'}:8 in encode; SELFFLOW_TRACEBACK=1 prints the "
                        "traceback)"), err
    # any other kind of error in plug-in code too (an AttributeError or an assert was a 30-line traceback)
    (tmp_path / "site" / "typo_waves.py").write_text(
        (tmp_path / "site" / "typo_waves.py").read_text().replace("batch['label']", "batch.media"))
    monkeypatch.delitem(sys.modules, "typo_waves", raising=False)
    monkeypatch.setattr(registry, "_MODALITIES", {k: v for k, v in registry._MODALITIES.items() if k != "typo_waves"})
    assert main(["train", "--no-progress", *[a for s in sets for a in ("--set", s)]]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("selfflow: error: AttributeError: 'dict' object has no attribute 'media' (in plug-in "
                          f"code at {tmp_path / 'site' / 'typo_waves.py'}:8 in encode;"), err
    monkeypatch.setenv("SELFFLOW_TRACEBACK", "1")
    with pytest.raises(AttributeError):
        main(["train", "--no-progress", *[a for s in sets for a in ("--set", s)]])


def test_the_example_package_declares_each_plug_in(monkeypatch):
    """``pip install -e examples/plugins`` (its pyproject.toml) registers the three examples the tests install."""
    from importlib.metadata import EntryPoint

    tomllib = pytest.importorskip("tomllib")  # Python ≥ 3.11
    project = tomllib.loads((PLUGINS / "pyproject.toml").read_text())
    modules = project["tool"]["setuptools"]["py-modules"]
    assert sorted(f"{m}.py" for m in modules) == sorted(p.name for p in PLUGINS.glob("*.py"))
    monkeypatch.syspath_prepend(str(PLUGINS))
    found = {group: {name: EntryPoint(name, value, group).load() for name, value in entries.items()}
             for group, entries in project["project"]["entry-points"].items()}
    assert found["selfflow.modalities"]["sine_waves"].name == "sine_waves"
    assert found["selfflow.backbones"]["toy_mlp"].config_cls.model_fields["arch"].default == "toy_mlp"
    assert found["selfflow.objectives"]["self_flow_noisier_mask"].name == "self_flow_noisier_mask"
    registry.check_modality_class(found["selfflow.modalities"]["sine_waves"], "examples/plugins/pyproject.toml")
