"""``selfflow plugins``: every installed extension with its source, each loaded and checked as a run would."""

from selfflow.core import backbones, registry
from selfflow.core.cli import main

from .test_backbones import _install_plugin


def test_plugins_lists_every_kind_and_names_a_broken_one(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(backbones, "_BACKBONES", dict(backbones._BACKBONES))
    monkeypatch.setattr(registry, "_MODALITIES", dict(registry._MODALITIES))
    _install_plugin(tmp_path, monkeypatch)  # toy_mlp = toy_mlp_backbone:SPEC
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out.splitlines()
    heads = [line for line in out if not line.startswith(" ")]
    assert heads == ["modalities (data.modality):", "backbones (model.arch):", "objective kinds (objective.kind):",
                     "online evaluators (eval.evaluators):"]
    rows = {line.split()[0]: line.split(maxsplit=1)[1] for line in out if line.startswith(" ")}
    assert rows["image"] == "selfflow.image.modality:ImageModality" and rows["mmdit"] == "built-in"
    assert rows["toy_mlp"] == "toy_mlp_backbone:SPEC" and rows["self_flow"] == "built-in"

    monkeypatch.setattr(backbones, "_BACKBONES", {k: v for k, v in backbones._BACKBONES.items() if k != "toy_mlp"})
    entry = tmp_path / "site" / "toy_mlp_backbone-0.1.dist-info" / "entry_points.txt"
    entry.write_text("[selfflow.backbones]\ntoy_mlp = toy_mlp_backbone:ToyMLP\n")  # the module class, not a pair
    assert main(["plugins"]) == 1
    broken = [line.split(maxsplit=1)[1] for line in capsys.readouterr().out.splitlines() if line.split()[0] == "toy_mlp"]
    assert broken == ["broken: entry point toy_mlp = 'toy_mlp_backbone:ToyMLP' "
                      "(selfflow.backbones) must give a (config_cls, module_cls) pair (or a function returning one), "
                      "got <class 'toy_mlp_backbone.ToyMLP'>"], broken
