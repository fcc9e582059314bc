from pathlib import Path

import pytest
import torch

from selfflow.core.config import ConfigError, load_config
from selfflow.core.run_setup import build_run

from .test_trainer import TINY

ROOT = Path(__file__).resolve().parents[2]


def _cfg(tmp_path, *extra):
    return load_config(None, [*TINY, f"output_dir={tmp_path}", "name=run", *extra])


def test_build_run_chains_modalities_objectives_and_a_seeded_backbone(tmp_path):
    run = build_run(_cfg(tmp_path))
    assert list(run.modalities) == ["image"] and not run.mixed
    assert run.objectives["image"].mask_ratio == 0.25
    assert run.model_config.modalities == {"image": run.modalities["image"].token_channels}
    again, other = build_run(_cfg(tmp_path)), build_run(_cfg(tmp_path, "train.seed=1"))
    first = next(iter(run.backbone.state_dict()))
    assert torch.equal(run.backbone.state_dict()[first], again.backbone.state_dict()[first])
    assert not torch.equal(run.backbone.state_dict()[first], other.backbone.state_dict()[first])
    assert next(build_run(_cfg(tmp_path), device="meta").backbone.parameters()).is_meta
    assert build_run(_cfg(tmp_path, "objective.kind=flow_matching")).backbone.projector is None


def test_inconsistent_modality_options_are_config_errors_naming_the_keys(tmp_path):
    from selfflow.core.run_setup import build_modalities

    with pytest.raises(ConfigError, match=r"data\.options\.image_size=30, data\.options\.patch_size=4: .*divisible"):
        build_modalities(_cfg(tmp_path, "data.options.image_size=30"))


def test_a_mixture_of_captioned_and_class_labelled_modalities_is_refused(tmp_path):
    """The paper-scale mixed recipe once paired class-labelled images with captioned video and audio: one
    backbone cannot condition on both (it failed on the first batch of the other kind, not at start)."""
    import yaml

    from selfflow.core.run_setup import build_modalities, build_model_config

    raw = yaml.safe_load((ROOT / "configs/tiny/mixed.yaml").read_text())
    raw["data"]["mixture"][0]["options"]["conditioning"] = "class"
    (tmp_path / "mixed.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(tmp_path / "mixed.yaml")
    with pytest.raises(ConfigError, match=r"share one conditioning; got \{'image': 'class', 'video': 'text', "
                                          r"'audio': 'text'\}"):
        build_model_config(cfg, build_modalities(cfg), uses_projector=True)


def test_freeze_matches_whole_dotted_parts_and_refuses_a_prefix_that_matches_nothing():
    """``single_blocks.1`` is block 1 — a plain string prefix also froze blocks 10 and 11 — and a typo such as
    ``double_block`` used to be a prefix of ``double_blocks`` (or froze nothing silently)."""
    from torch import nn

    from selfflow.core.run_setup import freeze

    def model():
        m = nn.Module()
        m.single_blocks = nn.ModuleList(nn.Linear(2, 2) for _ in range(12))
        m.double_blocks = nn.ModuleList(nn.Linear(2, 2) for _ in range(2))
        return m

    m = model()
    assert freeze(m, ["single_blocks.1", "single_blocks.1.bias", "double_blocks.0."]) == 6 + 6
    assert [n for n, p in m.named_parameters() if not p.requires_grad] == [
        "single_blocks.1.weight", "single_blocks.1.bias", "double_blocks.0.weight", "double_blocks.0.bias"]
    with pytest.raises(ConfigError, match=r"train.freeze: 'double_block' matches no parameter .* top-level "
                                          r"modules: double_blocks, single_blocks\)"):
        freeze(model(), ["double_block"])
