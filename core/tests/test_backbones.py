import inspect
import sys
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel

from selfflow.core import backbones
from selfflow.core.backbone_protocol import Backbone, BackboneConfig
from selfflow.core.backbones import build_backbone, protocol_gaps, register_backbone
from selfflow.core.config import ConfigError, load_config, save_config
from selfflow.core.dit import DiTConfig
from selfflow.core.metrics import read_metrics
from selfflow.core.mmdit import MMDiT, MMDiTConfig
from selfflow.core.trainer import Trainer

PLUGINS = Path(__file__).resolve().parents[2] / "examples" / "plugins"


@pytest.fixture(autouse=True)
def _private_registry(monkeypatch):
    """Registrations made by a test (explicit or through an entry point) do not leak into other tests."""
    monkeypatch.setattr(backbones, "_BACKBONES", dict(backbones._BACKBONES))


def test_built_in_backbones_satisfy_the_protocol():
    for cfg in (MMDiTConfig(modalities={"image": 12}), DiTConfig(modalities={"image": 16})):
        model = build_backbone(cfg)
        assert isinstance(cfg, BackboneConfig) and not protocol_gaps(model)
        assert len(model.blocks()) == model.depth == cfg.depth


def test_protocol_gaps_sees_submodules_that_a_static_lookup_misses():
    """Python 3.12's ``isinstance`` on a runtime protocol looks members up statically; the projector is a
    submodule, kept in ``nn.Module._modules``, so only a dynamic lookup finds it."""
    model = build_backbone(MMDiTConfig(modalities={"image": 12}))
    with pytest.raises(AttributeError):
        inspect.getattr_static(model, "projector")
    assert not protocol_gaps(model)
    assert protocol_gaps(torch.nn.Linear(2, 2)) == sorted(
        {*Backbone.__annotations__, *(n for n in vars(Backbone) if not n.startswith("_"))} - {"forward"})


def test_register_backbone_checks_its_arguments():
    with pytest.raises(TypeError, match="'arch' field defaulting to 'other'"):
        register_backbone("other", MMDiTConfig, MMDiT)
    with pytest.raises(TypeError, match="pydantic BaseModel"):
        register_backbone("mmdit", dict, MMDiT)
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        register_backbone("dit", DiTConfig, BaseModel)


def test_a_registered_module_missing_protocol_members_is_named():
    class Bare(torch.nn.Module):
        def __init__(self, cfg):
            super().__init__()

        def forward(self, x, ids, t, cond=None, **options):
            return x

    with pytest.raises(ValueError, match="backbone 'dit' is built in: register yours under another name"):
        register_backbone("dit", DiTConfig, Bare)
    register_backbone("dit", DiTConfig, Bare, replace=True)
    with pytest.raises(ValueError, match=r"lacks \['activation_checkpointing', 'blocks', 'depth'"):
        build_backbone(DiTConfig(modalities={"image": 16}))


def test_register_backbone_checks_the_config_fields_and_the_forward_signature():
    class NoFill(BaseModel):
        arch: str = "nofill"
        depth: int = 2

    class Lax(DiTConfig):
        arch: str = "lax"

    class NoForward(torch.nn.Module):
        pass

    class NoKeywords(torch.nn.Module):
        def forward(self, x, t, cond=None):
            return x

    with pytest.raises(TypeError, match=r"backbone 'nofill': NoFill needs the field\(s\) modalities, num_classes, "
                                        r"projector_mult, which the trainer fills"):
        register_backbone("nofill", NoFill, MMDiT)
    with pytest.raises(TypeError, match=r"backbone 'lax': NoForward does not define forward"):
        register_backbone("lax", Lax, NoForward)
    with pytest.raises(TypeError, match=r"NoKeywords\.forward\(self, x, t, cond=None\) must take \(self, x, ids, t, "
                                        r"cond=None, \*, modality, capture, stop_after, project\)"):
        register_backbone("lax", Lax, NoKeywords)


def test_a_typo_in_the_model_section_is_refused_even_by_a_lax_config_class():
    """pydantic drops undeclared keys unless the model forbids them: a config class without extra="forbid" would
    train at the default of a misspelt key."""
    class LaxConfig(BaseModel):  # no extra="forbid"
        arch: str = "lax"
        hidden_size: int = 32
        modalities: dict[str, int] = {}
        num_classes: int = 0
        projector_mult: float = 0.0
        depth: int = 2

    register_backbone("lax", LaxConfig, MMDiT)
    assert backbones.validate_model_config({"arch": "lax", "hidden_size": 64}).hidden_size == 64
    with pytest.raises(ConfigError, match=r"model\.hidden_sise: unknown key"):
        load_config(None, ["model={arch: lax, hidden_sise: 64}"])


def test_a_module_class_given_as_the_entry_point_is_named_not_called(tmp_path, monkeypatch):
    _install_plugin(tmp_path, monkeypatch, target="toy_mlp_backbone:ToyMLP")
    with pytest.raises(ConfigError, match=r"entry point toy_mlp = 'toy_mlp_backbone:ToyMLP' \(selfflow\.backbones\) "
                                          r"must give a \(config_cls, module_cls\) pair"):
        load_config(None, ["model.arch=toy_mlp"])


def test_a_forward_that_ignores_capture_is_named():
    from selfflow.core.backbone_protocol import captured

    velocity = torch.zeros(4, 16, 48)
    assert captured((velocity, {3: velocity}), (3,))[1][3] is velocity
    with pytest.raises(ValueError, match=r"asked for capture=\(3,\), must return \(velocity, \{block: features "
                                         r"\(B, L, D\)\}\) holding blocks \[3\]; got a tensor \(4, 16, 48\)"):
        captured(velocity, (3,))
    with pytest.raises(ValueError, match=r"got features of blocks \[2\]"):
        captured((velocity, {2: velocity}), (3,))


def test_unknown_arch_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"model\.arch: unknown backbone 'nope'; known: dit, mmdit"):
        load_config(None, ["model.arch=nope"])
    with pytest.raises(ConfigError, match=r"model\.depth_single: unknown key"):
        load_config(None, ["model.arch=dit", "model.depth_single=3"])


def _install_plugin(tmp_path: Path, monkeypatch, target: str = "toy_mlp_backbone:SPEC") -> None:
    """A distribution that advertises examples/plugins/toy_mlp_backbone.py, as `pip install` would leave it."""
    dist = tmp_path / "site" / "toy_mlp_backbone-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-mlp-backbone\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[selfflow.backbones]\ntoy_mlp = {target}\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.syspath_prepend(str(PLUGINS))
    monkeypatch.delitem(sys.modules, "toy_mlp_backbone", raising=False)


def test_a_broken_plugin_is_named_in_the_config_error(tmp_path, monkeypatch):
    _install_plugin(tmp_path, monkeypatch, target="no_such_module:SPEC")
    with pytest.raises(ConfigError, match=r"model: .*plug-in 'toy_mlp' \(entry point 'no_such_module:SPEC'\) "
                       "failed to load: ModuleNotFoundError"):
        load_config(None, ["model.arch=toy_mlp"])


def test_a_plugin_backbone_is_found_through_entry_points_and_trains(tmp_path, monkeypatch):
    model_keys = ["model.arch=toy_mlp", "model.hidden_size=32", "model.depth=3"]
    with pytest.raises(ConfigError, match="unknown backbone 'toy_mlp'"):
        load_config(None, model_keys)
    _install_plugin(tmp_path, monkeypatch)
    assert "toy_mlp" in backbones.available_backbones()
    with pytest.raises(ConfigError, match=r"model\.hidden_sise: unknown key"):
        load_config(None, ["model.arch=toy_mlp", "model.hidden_sise=32"])
    with pytest.raises(ConfigError, match=r"model\.depth: Input should be greater than or equal to 1"):
        load_config(None, ["model.arch=toy_mlp", "model.depth=0"])

    cfg = load_config(None, [
        *model_keys, "objective.kind=self_flow", "objective.student_layer=1", "objective.teacher_layer=2",
        "train.steps=2", "train.batch_size=4", "data.options.image_size=16", "data.options.patch_size=4",
        "sample.steps=2", "sample.num_samples=2", "logging.every=1", f"output_dir={tmp_path}", "name=plugin"])
    assert type(cfg.model).__name__ == "ToyMLPConfig" and cfg.model.depth == 3
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml").model == cfg.model
    assert not protocol_gaps(build_backbone(cfg.model.model_copy(update={"modalities": {"image": 48}})))

    import toy_mlp_backbone

    walks = []

    class RecordingWalk(toy_mlp_backbone.BlockWalk):
        def __init__(self, model, capture, stop_after, project):
            walks.append((capture, stop_after, project))
            super().__init__(model, capture, stop_after, project)

    monkeypatch.setattr(toy_mlp_backbone, "BlockWalk", RecordingWalk)
    trainer = Trainer(cfg, progress=False)
    assert isinstance(trainer.raw, toy_mlp_backbone.ToyMLP)
    trainer.fit()
    records = read_metrics(tmp_path / "plugin" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2] and records[-1]["loss_rep"] != 0  # the cosine term is on
    assert ((1,), None, True) in walks and ((2,), 2, False) in walks  # student capture, teacher early exit
