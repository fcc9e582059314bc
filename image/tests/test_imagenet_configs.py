"""The ImageNet 256 recipes validate with the paper's settings; their tiny CPU versions train."""

from pathlib import Path

import pytest
import torch

from selfflow.core.config import load_config
from selfflow.core.dit import DiTConfig
from selfflow.core.trainer import Trainer

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
KINDS = ["selfflow", "fm", "repa", "no_mask", "no_rep", "slightly_cleaner", "l2", "rae"]


def test_paper_recipes():
    sf = load_config(CONFIGS / "imagenet256" / "selfflow_sit_xl2.yaml")
    assert isinstance(sf.model, DiTConfig) and sf.model.hidden_size == 1152 and sf.model.depth == 28
    obj = sf.objective.resolve(28, 0.25, sf.objective.timesteps)
    assert (obj.mask_ratio, obj.gamma, obj.student_layer, obj.teacher_layer) == (0.25, 0.8, 8, 20)
    assert obj.timesteps.kind == "uniform" and sf.ema.decay == 0.9999
    assert (sf.optim.lr, sf.optim.betas, sf.optim.weight_decay, sf.optim.grad_clip) == (1e-4, (0.9, 0.999), 0, 1)
    assert sf.train.precision == "bf16" and sf.train.batch_size * 8 == 256
    assert sf.sample.solver == "sde" and sf.sample.steps == 250
    repa = load_config(CONFIGS / "imagenet256" / "repa_sit_xl2.yaml")
    r = repa.objective.resolve(28, 0.25, repa.objective.timesteps)
    assert r.gamma == 0.5 and r.student_layer == 8 and r.kind.alignment == "target" and not r.uses_teacher
    assert repa.model.projector_dims == (2048, 2048, 768) and repa.data.options["repa_resolution"] == 224
    fm = load_config(CONFIGS / "imagenet256" / "fm_sit_xl2.yaml").objective.resolve(28, 0.25, obj.timesteps)
    assert fm.gamma == 0 and fm.mask_ratio == 0
    nm = load_config(CONFIGS / "imagenet256" / "ablation_no_mask.yaml").objective.resolve(28, 0.25, obj.timesteps)
    assert nm.mask_ratio == 0 and nm.gamma == 0.8
    nr = load_config(CONFIGS / "imagenet256" / "ablation_no_rep.yaml").objective.resolve(28, 0.25, obj.timesteps)
    assert nr.mask_ratio == 0.25 and nr.gamma == 0
    for name, kind in (("slightly_cleaner", "self_flow_slightly_cleaner"), ("l2", "self_flow_l2")):
        ab = load_config(CONFIGS / "imagenet256" / f"ablation_{name}.yaml")
        ao = ab.objective.resolve(28, 0.25, ab.objective.timesteps)
        assert ao.kind.name == kind and (ao.mask_ratio, ao.gamma, ao.student_layer, ao.teacher_layer) == (0.25, 0.8, 8, 20)
        assert ab.model_dump(exclude={"name", "objective"}) == sf.model_dump(exclude={"name", "objective"})
    assert load_config(CONFIGS / "imagenet256" / "ablation_l2.yaml").objective.resolve(
        28, 0.25, obj.timesteps).kind.distance == "l2"
    rae = load_config(CONFIGS / "imagenet256" / "rae_selfflow.yaml")
    ro = rae.objective.resolve(28, 0.25, rae.objective.timesteps)
    assert rae.model.patch_size == 1 and rae.model.grid_size == 16 and rae.data.options["codec"] == "rae"
    assert ro.timesteps.kind == "plateau_logit_normal" and abs(ro.timesteps.shift - (768 * 256 / 4096) ** 0.5) < 1e-9
    assert (ro.mask_ratio, ro.gamma, ro.student_layer, ro.teacher_layer) == (0.25, 0.8, 8, 20)


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory):
    from transformers import Dinov2Config, Dinov2Model

    d = tmp_path_factory.mktemp("dinov2")
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             patch_size=14, image_size=112)).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def tiny_rae(tmp_path_factory):
    """A tiny random AutoencoderRAE: 32-px images → 4×4×64 latents (56-px encoder input, decoder patch 8)."""
    from diffusers import AutoencoderRAE

    d = tmp_path_factory.mktemp("rae")
    torch.manual_seed(0)
    AutoencoderRAE(encoder_hidden_size=64, encoder_num_hidden_layers=1, decoder_hidden_size=32,
                   decoder_num_hidden_layers=1, decoder_num_attention_heads=2, decoder_intermediate_size=64,
                   patch_size=8, encoder_input_size=56).save_pretrained(d)
    return d


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_recipe_trains(kind, tmp_path, tiny_dinov2, tiny_rae):
    sets = [f"output_dir={tmp_path}", "train.steps=2", "train.batch_size=4", "train.num_threads=1",
            "sample.num_samples=2", "sample.steps=3"]
    if kind == "repa":
        sets.append(f"data.options.repa_encoder={tiny_dinov2}")
    if kind == "rae":
        sets.append(f"data.options.vae_path={tiny_rae}")
    cfg = load_config(CONFIGS / "tiny" / f"imagenet256_{kind}.yaml", sets)
    trainer = Trainer(cfg, progress=False)
    result = trainer.fit()
    assert result["checkpoint"].is_file() and result["samples"].is_file()
    last = result["last"]
    assert torch.isfinite(torch.tensor(last["loss"]))
    if kind == "rae":
        assert trainer.run.modalities["image"].token_channels == 64 and trainer.run.modalities["image"].codec.grid == (1, 4, 4)
    if kind in ("selfflow", "no_mask", "slightly_cleaner", "l2", "repa", "rae"):
        assert last["loss_rep"] != 0  # the alignment term is computed
        assert trainer.raw.projector is not None
    else:
        assert last["loss_rep"] == 0 and trainer.raw.projector is None
    if kind == "l2":
        assert last["loss_rep"] > 0  # a squared distance, never negative as −cos can be
    if kind == "repa":
        assert trainer.run.modalities["image"].repa is not None and trainer.raw.projector(torch.zeros(1, 64)).shape == (1, 32)
