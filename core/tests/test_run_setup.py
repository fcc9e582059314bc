import pytest
import torch
from safetensors.torch import save_file

from selfflow.core.config import ConfigError, load_config, save_config
from selfflow.core.run_setup import build_run, load_run_model

from .test_trainer import TINY


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
