"""Pretrained directories (config.json + model.safetensors) and loading a model from any saved form."""

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from selfflow.core.checkpointer import Checkpointer
from selfflow.core.config import ConfigError, load_config, save_config
from selfflow.core.distributed import DistInfo
from selfflow.core.pretrained import from_pretrained, load_model, save_pretrained
from selfflow.core.run_setup import build_run

from .test_trainer import TINY

TEXT = ["data.options.conditioning=text", "data.options.text={kind: tiny, dim: 16}"]


def make_run_dir(tmp_path, *sets, name="run"):
    """A run directory (config.yaml + ema.safetensors) of a freshly built, slightly perturbed backbone."""
    cfg = load_config(None, [*TINY, f"output_dir={tmp_path}", f"name={name}", *sets])
    run = build_run(cfg)
    with torch.no_grad():
        for p in run.backbone.parameters():
            p.add_(0.01 * torch.randn_like(p))
    cfg.run_dir.mkdir(parents=True)
    save_config(cfg, cfg.run_dir / "config.yaml")
    save_file({k: v.contiguous() for k, v in run.backbone.state_dict().items()}, str(cfg.run_dir / "ema.safetensors"))
    return cfg.run_dir, run


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_save_then_load_round_trips_weights_and_configs(tmp_path):
    _, run = make_run_dir(tmp_path, *TEXT)
    out = save_pretrained(tmp_path / "pre", run.backbone.state_dict(), run.config, run.model_config)
    config = json.loads((out / "config.json").read_text())
    assert config["modalities"] == ["image"] and config["run_config"]["data"]["options"]["text"]["dim"] == 16
    loaded = from_pretrained(str(out), device="cpu")
    assert _same(loaded.model, run.backbone) and not loaded.model.training
    assert loaded.modality.context_dim == 16 and loaded.model_config == run.model_config


def test_a_weights_file_is_hard_linked_not_copied(tmp_path):
    run_dir, run = make_run_dir(tmp_path)
    out = save_pretrained(tmp_path / "pre", run_dir / "ema.safetensors", run.config, run.model_config)
    assert (out / "model.safetensors").stat().st_ino == (run_dir / "ema.safetensors").stat().st_ino
    assert _same(from_pretrained(out, "cpu").model, run.backbone)


def test_load_model_takes_a_run_dir_a_pretrained_dir_or_a_weights_file(tmp_path):
    run_dir, run = make_run_dir(tmp_path)
    pre = save_pretrained(tmp_path / "pre", run.backbone.state_dict(), run.config, run.model_config)
    for source in (run_dir, str(run_dir), run_dir / "ema.safetensors", pre, str(pre / "model.safetensors")):
        assert _same(load_model(source, "cpu").model, run.backbone), source
    with pytest.raises(ConfigError, match="is not a run directory"):
        load_model(tmp_path)
    # a file inside a model directory names the directory to pass (it said "not a run directory")
    with pytest.raises(ConfigError, match=rf"config\.yaml is a config of a model directory: pass the directory, {run_dir}"):
        load_model(run_dir / "config.yaml")
    other = tmp_path / "other"
    (other / "checkpoints").mkdir(parents=True)
    torch.save({}, other / "checkpoints" / "step_00000002.pt")
    with pytest.raises(ConfigError, match=rf"is a checkpoint of a model directory: pass the directory, {other}"):
        load_model(other / "checkpoints" / "step_00000002.pt")
    with pytest.raises(ConfigError, match=r"device: 'cuda:3' asked for, but no CUDA device|has \d+ CUDA device"):
        load_model(run_dir, "cuda:3")
    with pytest.raises(ConfigError, match=r"device: must be auto, cpu, cuda or cuda:N, got 'gpu0'"):
        load_model(run_dir, "gpu0")
    with pytest.raises(FileNotFoundError, match=r"nope does not exist \(expected a run directory"):
        load_model(tmp_path / "nope")
    with pytest.raises(ConfigError, match=r"trained \['image'\], not 'audio'"):
        load_model(pre, "cpu", "audio")
    with pytest.raises(ConfigError, match=r"trained \['image'\], not 'audio'"):
        load_model(run_dir, "cpu", "audio")
    with pytest.raises(FileNotFoundError, match="no weights in"):  # a run's model weights live in its checkpoints
        load_model(run_dir, "cpu", weights="model")
    for source in (pre, pre / "model.safetensors"):  # one set of weights: asking for the other is an error
        with pytest.raises(ConfigError, match=r"is a pretrained directory: .* weights=.model. cannot be chosen"):
            load_model(source, "cpu", weights="model")


def test_weights_that_are_not_finite_or_do_not_fit_are_refused_naming_the_file(tmp_path):
    from selfflow.core.checkpoint import CheckpointLoadError

    run_dir, run = make_run_dir(tmp_path)
    state = {k: v.clone().contiguous() for k, v in run.backbone.state_dict().items()}
    pre = save_pretrained(tmp_path / "pre", state, run.config, run.model_config)
    first = next(iter(state))
    for weights in (run_dir / "ema.safetensors", pre / "model.safetensors"):
        save_file({**state, first: torch.full_like(state[first], float("nan"))}, str(weights))
        with pytest.raises(CheckpointLoadError, match=rf"{weights.name} is not finite: {first} holds NaN"):
            load_model(weights.parent, "cpu")
        save_file({**state, first: torch.zeros(3)}, str(weights))
        with pytest.raises(CheckpointLoadError, match=rf"the weights in {weights.parent} do not fit its config "
                                                      rf"\(size mismatch for {re.escape(first)}: copying a param"):
            load_model(weights.parent, "cpu")  # the key, not only torch's header line


def test_a_config_that_builds_another_model_is_refused(tmp_path):
    _, run = make_run_dir(tmp_path)
    pre = save_pretrained(tmp_path / "pre", run.backbone.state_dict(), run.config, run.model_config)
    config = json.loads((pre / "config.json").read_text())
    config["model_config"]["hidden_size"] = 64
    (pre / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"builds a different model \(keys \['hidden_size'\]\)"):
        from_pretrained(pre)
    (pre / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="not a selfflow pretrained config"):
        from_pretrained(pre)
    # a newer layout, a non-mapping field or a bad run_config: one line naming the file and the key
    for change, says in (({"version": 99}, r"layout version 99; this selfflow reads version 1"),
                         ({"data_facts": "x"}, r'"data_facts" must be a mapping'),
                         ({"run_config": 1}, r"invalid run_config: run_config: Input should be a valid dictionary")):
        (pre / "config.json").write_text(json.dumps({**config, "model_config": run.model_config.model_dump(mode="json"),
                                                     **change}))
        with pytest.raises(ConfigError, match=says):
            from_pretrained(pre)


def test_the_ema_export_writes_a_pretrained_directory_beside_it(tmp_path):
    cfg = load_config(None, [*TINY, f"output_dir={tmp_path}", "name=exp"])
    run = build_run(cfg)
    ckpt = Checkpointer(cfg, DistInfo(), {})
    ema = ckpt.export_ema(run.backbone, run.model_config)
    assert ema == cfg.run_dir / "ema.safetensors"
    assert _same(from_pretrained(cfg.run_dir / "pretrained", "cpu").model, run.backbone)


@pytest.mark.parametrize("kind", ["self_flow", "flow_matching"])  # with and without a projector
def test_a_model_trained_with_an_objective_not_installed_here_loads_with_a_warning(tmp_path, kind, caplog):
    run_dir, run = make_run_dir(tmp_path, f"objective.kind={kind}")
    pre = save_pretrained(tmp_path / "pre", run.backbone.state_dict(), run.config, run.model_config)
    (run_dir / "config.yaml").write_text((run_dir / "config.yaml").read_text().replace(
        f"kind: {kind}", "kind: my_plugin_objective"))
    config = json.loads((pre / "config.json").read_text())
    config["run_config"]["objective"]["kind"] = "my_plugin_objective"
    (pre / "config.json").write_text(json.dumps(config))
    for source in (run_dir, pre):
        caplog.clear()
        loaded = load_model(source, "cpu")
        assert _same(loaded.model, run.backbone), source
        assert loaded.config.objective.kind == "my_plugin_objective"  # an export keeps it
        assert "objective.kind 'my_plugin_objective', which is not installed here" in caplog.text
    with pytest.raises(ConfigError, match=r"unknown objective\.kind 'my_plugin_objective'"):  # training needs it
        load_config(run_dir / "config.yaml")


def test_a_run_that_trained_on_after_its_ema_export_loads_its_newest_checkpoint(tmp_path, caplog):
    """ema.safetensors is written when a run finishes; resumed with more steps and stopped, the run's newer
    checkpoint holds the EMA that sampling, evaluation and export must use (they silently used the old file)."""
    import os

    from selfflow.core.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
    from selfflow.core.run_setup import read_run_weights
    from selfflow.core.trainer import Trainer

    cfg = load_config(None, [*TINY, f"output_dir={tmp_path}", "name=trained_on", "train.steps=2"])
    Trainer(cfg, progress=False).fit()
    run_dir, export = cfg.run_dir, cfg.run_dir / "ema.safetensors"
    step, path = list_checkpoints(run_dir / "checkpoints")[-1]
    state = load_checkpoint(path)
    state["ema"] = {k: v + 1 if v.is_floating_point() else v for k, v in state["ema"].items()}  # trained on
    newer = save_checkpoint(state, run_dir / "checkpoints", step + 3)
    os.utime(newer, (export.stat().st_mtime + 5,) * 2)
    with caplog.at_level("WARNING"):
        weights = read_run_weights(run_dir)
    assert all(torch.equal(weights[k], v) for k, v in state["ema"].items())
    assert f"{export} is older than {newer} (the run trained on after it was written)" in caplog.text
    os.utime(export, (newer.stat().st_mtime + 5,) * 2)  # exported after that checkpoint: the file again
    from selfflow.core.checkpoint import load_weights

    assert all(torch.equal(read_run_weights(run_dir)[k], v) for k, v in load_weights(export).items())
