from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from selfflow.core.config import ConfigError, load_config, save_config
from selfflow.core.run_setup import build_run, load_run_model

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


def test_load_run_model_reads_a_run_directory_given_as_str(tmp_path):
    cfg = _cfg(tmp_path)
    trained = build_run(cfg).backbone
    with torch.no_grad():
        next(trained.parameters()).add_(1.0)
    cfg.run_dir.mkdir(parents=True)
    save_config(cfg, cfg.run_dir / "config.yaml")
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(cfg.run_dir / "ema.safetensors"))
    model, modality, loaded_cfg = load_run_model(str(cfg.run_dir), device="cpu")
    assert modality.name == "image" and loaded_cfg == cfg and not model.training
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), trained.state_dict().values()))
    with pytest.raises(ConfigError, match=r"trained \['image'\], not 'audio'"):
        load_run_model(cfg.run_dir, modality_name="audio")
    with pytest.raises(FileNotFoundError, match="no weights in"):
        load_run_model(cfg.run_dir, weights="model")
    with pytest.raises(ConfigError, match="is not a run directory"):
        load_run_model(str(tmp_path))


def test_inconsistent_modality_options_are_config_errors_naming_the_keys(tmp_path):
    from selfflow.core.run_setup import build_modalities

    with pytest.raises(ConfigError, match=r"data\.options\.image_size=30, data\.options\.patch_size=4: .*divisible"):
        build_modalities(_cfg(tmp_path, "data.options.image_size=30"))


def test_run_weights_that_are_not_finite_or_do_not_fit_are_refused_naming_the_file(tmp_path):
    from selfflow.core.checkpoint import CheckpointLoadError

    cfg = _cfg(tmp_path)
    state = {k: v.clone().contiguous() for k, v in build_run(cfg).backbone.state_dict().items()}
    cfg.run_dir.mkdir(parents=True)
    save_config(cfg, cfg.run_dir / "config.yaml")
    ema = cfg.run_dir / "ema.safetensors"
    first = next(iter(state))
    save_file({**state, first: torch.full_like(state[first], float("nan"))}, str(ema))
    with pytest.raises(CheckpointLoadError, match=rf"ema\.safetensors is not finite: {first} holds NaN"):
        load_run_model(cfg.run_dir, device="cpu")
    save_file({**state, first: torch.zeros(3)}, str(ema))
    with pytest.raises(CheckpointLoadError, match=r"the ema weights in .* do not fit its config\.yaml"):
        load_run_model(cfg.run_dir, device="cpu")


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
