from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL

from selfflow.core.tokens import patchify
from selfflow.image.modality import ImageModality
from selfflow.image.sd_vae import SD_VAE_SCALE, SDVAE, LatentCodec


def test_scaled_latents_and_token_layout(tiny_vae_dir):
    vae = SDVAE.from_pretrained(tiny_vae_dir)
    raw = AutoencoderKL.from_pretrained(tiny_vae_dir).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        ref = raw.encode(x).latent_dist.mean * SD_VAE_SCALE
        assert torch.allclose(vae.encode(x), ref, atol=1e-6)
        z = torch.randn(2, 4, 8, 8)
        assert torch.allclose(vae.decode(z), raw.decode(z / SD_VAE_SCALE).sample.clamp(-1, 1), atol=1e-6)
    codec = LatentCodec(vae, 16, 2)
    assert codec.token_channels == 16 and codec.grid == (1, 4, 4)
    tokens = codec.to_tokens(x)
    assert torch.allclose(tokens.x, patchify(ref.unsqueeze(2), (1, 2, 2)).x, atol=1e-6)
    assert codec.from_tokens(tokens.x).shape == (2, 3, 16, 16)
    # the image modality runs on SD-VAE tokens (online encoding of the synthetic stream)
    mod = ImageModality({"codec": "sd_vae", "vae_path": str(tiny_vae_dir), "image_size": 16, "patch_size": 2,
                         "device": "cpu"})
    batch = next(iter(mod.stream(2, seed=0)))
    tk, cond = mod.encode(batch, "cpu")
    assert tk.x.shape == (2, 16, 16) and mod.token_channels == 16 and cond.labels.shape == (2,)
    assert mod.evaluation_array(mod.decode(tk.x)).shape == (2, 16, 16, 3)


def test_loading_prints_no_install_accelerate_notice(tiny_vae_dir):
    """Without accelerate, diffusers' default load printed "Cannot initialize model with low cpu memory usage
    because `accelerate` was not found … pip install accelerate" at every VAE load of every run."""
    import logging

    said = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    logger = logging.getLogger("diffusers")  # diffusers' own handler writes to the stderr it saw at import
    logger.addHandler(handler)
    try:
        SDVAE.from_pretrained(tiny_vae_dir)
    finally:
        logger.removeHandler(handler)
    assert not [m for m in said if "accelerate" in m], said


def test_missing_vae_names_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no AutoencoderKL at .*nothing.*sd-vae-ft-ema"):
        SDVAE.from_pretrained(tmp_path / "nothing")
    with pytest.raises(ValueError, match="vae_path"):
        ImageModality({"codec": "sd_vae"})


def test_a_run_resumes_exactly_with_its_vae_moved_and_refuses_other_weights(tiny_vae_dir, tmp_path):
    """The VAE folder (a ``model_location``) copied elsewhere between two sessions — another cluster, another
    disk: a resume accepts the new path when the folder holds the same files (the fingerprint the checkpoint
    kept), logs the move, and continues with the uninterrupted run's numbers; other weights there are refused,
    naming both fingerprints, and so are other weights put at the same path. The text cache folder (a
    ``cache_location``) may move freely. Any changed path used to refuse the resume, and weights replaced in
    place went unnoticed."""
    import shutil

    from selfflow.core.config import ConfigError, load_config
    from selfflow.core.metrics import read_metrics
    from selfflow.core.trainer import Trainer

    here, there, other = tmp_path / "here", tmp_path / "there", tmp_path / "other"
    shutil.copytree(tiny_vae_dir, here)

    def fit(name: str, vae: Path, steps: int, cache: str = "cache-a") -> list[float]:
        cfg = load_config("configs/tiny/image.yaml", [
            f"output_dir={tmp_path}", f"name={name}", "data.options.codec=sd_vae", f"data.options.vae_path={vae}",
            "data.options.image_size=16", "data.options.patch_size=2", "data.options.device=cpu",
            "data.options.conditioning=text", f"data.options.text.cache_dir={tmp_path / cache}", "model.class_token=false",
            f"train.steps={steps}", "train.batch_size=2", "checkpoint.every=2", "sample.every=0", "logging.every=1"])
        tr = Trainer(cfg, progress=False)
        with tr.log.text_log():
            tr.fit()
        return [r["loss"] for r in read_metrics(tmp_path / name / "metrics.jsonl") if "loss" in r]

    whole = fit("whole", here, 4)
    fit("split", here, 2)
    shutil.copytree(here, there)
    shutil.rmtree(here)  # the weights are gone from where the run began
    assert fit("split", there, 4, cache="cache-b") == whole
    log = (tmp_path / "split" / "train.log").read_text()
    assert "data.options.vae_path" in log and "data.options.text.cache_dir" in log  # the moves are logged
    torch.manual_seed(1)
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                  norm_num_groups=8, sample_size=32).save_pretrained(other)
    with pytest.raises(ConfigError, match=r"data\.options\.vae_path \(checkpoint .*there.*, now .*other.*\) — other "
                                          r"files: fingerprint [0-9a-f]{16} then, [0-9a-f]{16} now"):
        fit("split", other, 6)
    shutil.rmtree(there)
    shutil.copytree(other, there)  # other weights where the run's were
    with pytest.raises(ConfigError, match=r"data\.options\.vae_path \(.*there'.*\) holds other files than when the "
                                          r"checkpoint was written \(fingerprint [0-9a-f]{16} then"):
        fit("split", there, 6)
    # A checkpoint from before fingerprints were kept cannot tell a move from other weights: refused, saying so.
    newest = tmp_path / "split" / "checkpoints" / "step_00000004.pt"
    state = torch.load(newest, weights_only=True)
    del state["model_files"]
    torch.save(state, newest)
    shutil.copytree(there, here)
    with pytest.raises(ConfigError, match="kept no fingerprint of the folder it read"):
        fit("split", here, 6)


def test_a_trained_model_samples_with_its_vae_elsewhere_on_this_machine(tiny_vae_dir, tmp_path, caplog):
    """A run (or its export) used where its VAE folder lies elsewhere — another machine, a laptop: ``--set
    data.options.vae_path=…`` (``locations`` in Python) points it there for sample, eval and export; the run's
    config needs no edit. Keys that would change the model are refused, naming those that may be set. Before,
    the only way was to edit config.yaml (or config.json inside an export). Other weights than the run trained
    with are loaded with a warning (another decoder of the same latent space can be a choice)."""
    import json
    import re
    import shutil

    from selfflow.core import load
    from selfflow.core.cli import main
    from selfflow.core.config import ConfigError, load_config
    from selfflow.core.pretrained import load_model
    from selfflow.core.trainer import Trainer

    shutil.copytree(tiny_vae_dir, tmp_path / "vae")
    cfg = load_config("configs/tiny/image.yaml", [
        f"output_dir={tmp_path}", "name=run", "data.options.codec=sd_vae", f"data.options.vae_path={tmp_path / 'vae'}",
        "data.options.image_size=16", "data.options.patch_size=2", "data.options.device=cpu", "train.steps=1",
        "train.batch_size=2", "sample.every=0"])
    Trainer(cfg, progress=False).fit()
    (tmp_path / "vae").rename(tmp_path / "moved")
    with pytest.raises(FileNotFoundError, match="vae_path"):
        load_model(tmp_path / "run", "cpu")
    here = [f"data.options.vae_path={tmp_path / 'moved'}"]
    assert main(["sample", "--run", str(tmp_path / "run"), "--num", "2", "--steps", "2", "--no-progress",
                 "--device", "cpu", "--out", str(tmp_path / "grid.png"), "--set", here[0]]) == 0
    assert (tmp_path / "grid.png").is_file()
    assert main(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "pre"), "--set", here[0]]) == 0
    (tmp_path / "moved").rename(tmp_path / "again")
    again = load(tmp_path / "pre", device="cpu", locations={"data.options.vae_path": tmp_path / "again"})  # a Path
    assert again.modality.options.vae_path == str(tmp_path / "again")
    with pytest.raises(ConfigError, match=r"--set model\.depth: a trained model takes only where things lie .*"
                                          r"data\.options\.vae_path"):
        load_model(tmp_path / "pre", "cpu", locations=["model.depth=2"])
    # The fingerprint of the VAE the run trained with travels with it (data_facts.json, the export's config.json):
    # the same files anywhere load quietly, other weights load with a warning naming both fingerprints.
    recorded = json.loads((tmp_path / "run" / "data_facts.json").read_text())["model_files"]
    assert list(recorded) == ["data.options.vae_path"]
    assert json.loads((tmp_path / "pre" / "config.json").read_text())["data_facts"]["model_files"] == recorded
    assert "holds other files" not in caplog.text
    torch.manual_seed(1)
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                  norm_num_groups=8, sample_size=32).save_pretrained(tmp_path / "other")
    load(tmp_path / "pre", device="cpu", locations={"data.options.vae_path": str(tmp_path / "other")})
    assert re.search(r"data\.options\.vae_path holds other files than .*pre was trained with \(fingerprint "
                     rf"{recorded['data.options.vae_path']} then, [0-9a-f]{{16}} now\)", caplog.text), caplog.text
