"""``selfflow prepare imagenet --codec flux2|rae`` with tiny random autoencoders; training on the shards."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from diffusers import AutoencoderRAE

from selfflow.core.cli import main
from selfflow.core.config import load_config
from selfflow.core.data.shard_format import shard_urls
from selfflow.core.trainer import Trainer
from selfflow.image.codecs import load_autoencoder
from selfflow.image.latent_shards import imagenet_stream
from selfflow.image.modality import ImageModality
from selfflow.image.prepare_image_text import load_image
from selfflow.image.prepare_imagenet import list_images
from selfflow.image.rae import rae_latent_stats

from .conftest import tiny_flux2_ae, write_jpeg_folder

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny"


@pytest.fixture(scope="module")
def codec_dirs(tmp_path_factory):
    """Tiny random autoencoders at 32 px: FLUX.2 (4 raw channels, downsampling 2 → 16×8×8 after the 2×2
    patchify, non-trivial BN statistics) and RAE (4×4×64 latents, non-trivial latent statistics)."""
    torch.manual_seed(0)
    flux2 = tiny_flux2_ae()
    mean, std = rae_latent_stats(torch.randn(64, 4, 4), torch.rand(64, 4, 4) + 0.2)
    rae = AutoencoderRAE(encoder_hidden_size=64, encoder_num_hidden_layers=1, decoder_hidden_size=32,
                         decoder_num_hidden_layers=1, decoder_num_attention_heads=2, decoder_intermediate_size=64,
                         patch_size=8, encoder_input_size=56, latents_mean=mean, latents_std=std)
    dirs = {"flux2": tmp_path_factory.mktemp("flux2"), "rae": tmp_path_factory.mktemp("rae")}
    flux2.save_pretrained(dirs["flux2"])
    rae.save_pretrained(dirs["rae"])
    return dirs


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    return write_jpeg_folder(tmp_path_factory.mktemp("train"), seed=1, per_class=3, size=(36, 80), signal=220,
                             broken_in="n01", broken_bytes=b"\xff\xd8\xff\xe0 truncated")


@pytest.mark.parametrize("codec", ["flux2", "rae"])
def test_prepared_latents_equal_direct_encoding_and_train(codec, codec_dirs, jpeg_folder, tmp_path, capsys):
    out = tmp_path / "shards"
    args = ["prepare", "imagenet", "--codec", codec, "--src", str(jpeg_folder), "--out", str(out),
            "--vae", str(codec_dirs[codec]), "--image-size", "32", "--shard-size", "2", "--batch-size", "2",
            "--flip", "--device", "cpu", "--no-progress"]
    assert main(args) == 0
    assert "6 images in shards, 1 unreadable images skipped" in capsys.readouterr().out
    shape = {"flux2": [16, 8, 8], "rae": [64, 4, 4]}[codec]
    info = json.loads((out / "codec.json").read_text())
    assert info == {"codec": codec, "image_size": 32, "stored": "latent", "latent_shape": shape, "flip": True,
                    "scaling_factor": None}

    vae = load_autoencoder(codec, codec_dirs[codec])
    files, _ = list_images(jpeg_folder)
    shards = shard_urls(out)
    samples = [s for sh in shards for s in wds.WebDataset(sh, shardshuffle=False, empty_check=False)]
    assert len(samples) == 6 and all("moments.npy" not in s for s in samples)
    for s in samples:
        f, label = files[int(s["__key__"])]
        assert int(s["cls"]) == label
        x = load_image(str(f), 32)[None]  # the same ADM crop in [-1, 1]
        stored = np.load(io.BytesIO(s["latent.npy"]))
        assert stored.dtype == np.float32 and list(stored.shape) == shape
        np.testing.assert_allclose(stored, vae.encode(x)[0].numpy(), atol=1e-5, rtol=0)
        np.testing.assert_allclose(np.load(io.BytesIO(s["latent_flip.npy"])), vae.encode(x.flip(-1))[0].numpy(),
                                   atol=1e-5, rtol=0)

    # the reader returns the stored latents as they are (or their mirrored version)
    batch = next(iter(imagenet_stream(str(out), 3, seed=0, rank=0, world_size=1, flip=True, shuffle_buffer=1)))
    stored = {s["__key__"]: (np.load(io.BytesIO(s["latent.npy"])), np.load(io.BytesIO(s["latent_flip.npy"])))
              for s in samples}
    for z in batch["latents"].numpy():
        assert any(np.array_equal(z, a) or np.array_equal(z, b) for a, b in stored.values())

    sets = [f"output_dir={tmp_path}", "train.steps=2", "train.batch_size=2", "train.num_threads=1",
            "sample.num_samples=2", "sample.steps=2", "data.options.dataset=latent_shards",
            f"data.options.shards={out}", f"data.options.vae_path={codec_dirs[codec]}", "data.options.num_classes=2",
            "data.options.flip=true"]
    trainer = Trainer(load_config(TINY / f"imagenet256_{codec}.yaml", sets), progress=False)
    assert trainer.run.modalities["image"].token_channels == shape[0]
    result = trainer.fit()
    assert result["samples"].is_file() and np.isfinite(result["last"]["loss"])

    other = "rae" if codec == "flux2" else "flux2"
    with pytest.raises(ValueError, match=f"holds {codec} latents but data.options.codec is {other}"):
        ImageModality({"dataset": "latent_shards", "shards": str(out), "codec": other, "vae_path": "x"})


def test_imagenet_dtype_float16_and_rae_size_check(codec_dirs, jpeg_folder, tmp_path, capsys):
    out = tmp_path / "f16"
    base = ["prepare", "imagenet", "--src", str(jpeg_folder), "--out", str(out), "--image-size", "32",
            "--shard-size", "8", "--device", "cpu", "--no-progress"]
    assert main([*base, "--codec", "flux2", "--vae", str(codec_dirs["flux2"]), "--latent-dtype", "float16"]) == 0
    s = next(iter(wds.WebDataset(shard_urls(out)[0], shardshuffle=False, empty_check=False)))
    assert np.load(io.BytesIO(s["latent.npy"])).dtype == np.float16
    # a one-line error with exit 2 (it used to escape as a traceback)
    assert main([*base, "--image-size", "64", "--codec", "rae", "--vae", str(codec_dirs["rae"])]) == 2
    assert "selfflow: error: codec rae needs image_size 32" in capsys.readouterr().err


def test_flux2_recipe_validates():
    cfg = load_config(TINY.parent / "imagenet256" / "flux2_selfflow.yaml")
    assert cfg.model.patch_size == 1 and cfg.model.grid_size == 16 and cfg.data.options["codec"] == "flux2"
    obj = cfg.objective.resolve(28, 0.25, cfg.objective.timesteps)
    assert (obj.mask_ratio, obj.gamma, obj.student_layer, obj.teacher_layer) == (0.25, 0.8, 8, 20)
    assert abs(obj.timesteps.shift - (128 * 256 / 4096) ** 0.5) < 1e-9
    assert obj.timesteps.kind == "logit_normal"  # the paper's distribution for its FLUX.2-AE runs
