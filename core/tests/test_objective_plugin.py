"""An objective kind from a package outside core, found through the ``selfflow.objectives`` entry points."""

import sys
from pathlib import Path

import pytest
import torch

from selfflow.core import registry
from selfflow.core.ema import make_ema
from selfflow.core.mmdit import MMDiT
from selfflow.core.noise_plan import StepNoise
from selfflow.core.objective import ObjectiveConfig
from selfflow.core.timesteps import TimestepDistribution
from selfflow.core.tokens import Conditioning, Tokens, grid_ids

from .conftest import tiny_config

PLUGINS = Path(__file__).resolve().parents[2] / "examples" / "plugins"


def _install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, entry: str) -> None:
    """A fake installed distribution declaring ``entry`` in the group, with examples/plugins importable."""
    dist = tmp_path / "noisier_mask_objective-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: noisier-mask-objective\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[selfflow.objectives]\n{entry}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(PLUGINS))
    monkeypatch.setattr(registry, "_OBJECTIVES", dict(registry._OBJECTIVES))  # forget the loaded kind afterwards
    monkeypatch.delitem(sys.modules, "noisier_mask_objective", raising=False)


def test_a_plugin_kind_is_found_and_trains_one_step(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"unknown objective\.kind 'self_flow_noisier_mask'"):
        ObjectiveConfig(kind="self_flow_noisier_mask")
    _install(tmp_path, monkeypatch, "self_flow_noisier_mask = noisier_mask_objective:NOISIER_MASK")
    assert "self_flow_noisier_mask" in registry.available_objectives()
    obj = ObjectiveConfig(kind="self_flow_noisier_mask", label_dropout=0.0).resolve(
        4, 0.25, TimestepDistribution())
    assert obj.uses_teacher and obj.mask_ratio == 0.25
    dual = StepNoise.draw((64, 16, 12), obj, torch.Generator().manual_seed(0), "cpu").dual
    assert (dual.s >= dual.t).all() and torch.equal(dual.tau_min, dual.t)

    model = MMDiT(tiny_config())
    teacher = make_ema(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    tokens = Tokens(torch.randn(4, 16, 12), grid_ids(1, 4, 4, batch=4))
    losses = obj.loss(model, teacher, tokens, Conditioning(labels=torch.arange(4)), null_label=5, modality=None,
                      generator=torch.Generator().manual_seed(0))
    opt.zero_grad()
    losses["loss"].backward()
    opt.step()
    assert torch.isfinite(losses["loss"]) and losses["loss_rep"].item() != 0


def test_a_plugin_entry_that_is_not_an_objective_kind_is_a_clear_error(tmp_path, monkeypatch):
    _install(tmp_path, monkeypatch, "self_flow_noisier_mask = noisier_mask_objective:noisier_second_level")
    with pytest.raises(ValueError, match="must be an ObjectiveKind named 'self_flow_noisier_mask'"):
        registry.get_objective("self_flow_noisier_mask")
    # in a config: a validation error naming objective.kind (it was a TypeError traceback from a validator)
    with pytest.raises(ValueError, match=r"kind\n.*must be an ObjectiveKind named"):
        ObjectiveConfig(kind="self_flow_noisier_mask")


def test_a_plugin_whose_module_does_not_import_is_named(tmp_path, monkeypatch):
    _install(tmp_path, monkeypatch, "self_flow_noisier_mask = no_such_plugin_module:KIND")
    with pytest.raises(ValueError, match=r"the selfflow\.objectives entry point self_flow_noisier_mask = "
                                         r"no_such_plugin_module:KIND failed to load: ModuleNotFoundError"):
        registry.get_objective("self_flow_noisier_mask")
