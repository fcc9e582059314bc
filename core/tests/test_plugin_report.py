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


def test_a_plugin_named_like_a_built_in_and_two_packages_with_one_name_are_flagged(tmp_path, monkeypatch, capsys):
    """Both used to pass unnoticed: a run used the built-in while the listing showed the plug-in, and of two
    packages registering one name the one later on sys.path won."""
    monkeypatch.setattr(backbones, "_BACKBONES", dict(backbones._BACKBONES))
    monkeypatch.setattr(registry, "_MODALITIES", dict(registry._MODALITIES))
    _install_plugin(tmp_path, monkeypatch, target="toy_mlp_backbone:SPEC")
    entry = tmp_path / "site" / "toy_mlp_backbone-0.1.dist-info" / "entry_points.txt"
    entry.write_text("[selfflow.backbones]\nmmdit = toy_mlp_backbone:SPEC\ntoy_mlp = toy_mlp_backbone:SPEC\n")
    twin = tmp_path / "site" / "twin-0.1.dist-info"
    twin.mkdir()
    (twin / "METADATA").write_text("Metadata-Version: 2.1\nName: twin\nVersion: 0.1\n")
    (twin / "entry_points.txt").write_text("[selfflow.backbones]\ntoy_mlp = twin_module:SPEC\n")
    assert main(["plugins"]) == 1
    rows = {line.split()[0]: line.split(maxsplit=1)[1] for line in capsys.readouterr().out.splitlines()
            if line.startswith(" ")}
    assert "the entry point mmdit = toy_mlp_backbone:SPEC " \
        "(selfflow.backbones) is ignored: the built-in mmdit comes first; rename it" in rows["mmdit"]
    assert ("several installed packages register the selfflow.backbones entry point toy_mlp: toy_mlp_backbone:SPEC, "
            "twin_module:SPEC") in rows["toy_mlp"]
