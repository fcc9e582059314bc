"""``selfflow prepare imagenet`` on a generated JPEG folder with a tiny random AutoencoderKL."""

import io

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from selfflow.core.cli import main
from selfflow.core.data.shard_format import shard_urls
from selfflow.image.latent_shards import imagenet_stream
from selfflow.image.prepare_imagenet import center_crop_adm, list_images
from selfflow.image.sd_vae import SDVAE

from .conftest import write_jpeg_folder


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    return write_jpeg_folder(tmp_path_factory.mktemp("train"), seed=0, per_class=4, size=(40, 90), signal=200,
                             broken_in="n02", broken_bytes=b"\xff\xd8\xff\xe0 not really a jpeg")


def test_prepare_writes_moments_equal_to_direct_encoding(tiny_vae_dir, jpeg_folder, tmp_path, capsys):
    out = tmp_path / "shards"
    args = ["prepare", "imagenet", "--src", str(jpeg_folder), "--out", str(out), "--vae", str(tiny_vae_dir),
            "--image-size", "32", "--shard-size", "4", "--batch-size", "3", "--flip", "--store-pixels",
            "--device", "cpu", "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "8 images in shards, 1 unreadable images skipped" in printed
    shards = shard_urls(out)
    assert [s.rsplit("/", 1)[-1] for s in shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]

    vae = SDVAE.from_pretrained(tiny_vae_dir)
    files, classes = list_images(jpeg_folder)
    assert classes == ["n01", "n02"]
    samples = [s for shard in shards for s in wds.WebDataset(shard, shardshuffle=False, empty_check=False)]
    assert len(samples) == 8
    for s in samples:
        index = int(s["__key__"])
        f, label = files[index]
        assert f.name != "broken.JPEG" and int(s["cls"]) == label
        crop = center_crop_adm(Image.open(f).convert("RGB"), 32)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(s["png"]))), np.asarray(crop))
        x = torch.from_numpy(np.asarray(crop, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
        mean, std = vae.moments(x)
        stored = np.load(io.BytesIO(s["moments.npy"]))
        assert stored.shape == (8, 16, 16)
        assert np.allclose(stored, torch.cat([mean, std], 1)[0].numpy(), atol=1e-5)
        fm, _ = vae.moments(x.flip(-1))
        assert np.allclose(np.load(io.BytesIO(s["moments_flip.npy"]))[:4], fm[0].numpy(), atol=1e-5)

    # a second run finds every shard done and rewrites nothing
    mtime = {s: (out / s.rsplit("/", 1)[-1]).stat().st_mtime_ns for s in shards}
    assert main(args) == 0
    assert "0 shard(s) written, 3 already done" in capsys.readouterr().out
    assert mtime == {s: (out / s.rsplit("/", 1)[-1]).stat().st_mtime_ns for s in shards}


def test_adm_center_crop():
    img = Image.fromarray(np.arange(100 * 60 * 3, dtype=np.uint32).reshape(100, 60, 3).astype(np.uint8))
    out = center_crop_adm(img, 16)  # 60×100 → box-halved once to 30×50 (< 32), bicubic to 16×27, centre crop
    assert out.size == (16, 16)
    ref = img.resize((30, 50), Image.BOX).resize((16, 27), Image.BICUBIC)
    assert np.array_equal(np.asarray(out), np.asarray(ref)[5:21, :16])


def test_latent_stream_splits_ranks_samples_moments_and_resumes(tiny_vae_dir, jpeg_folder, tmp_path):
    out = tmp_path / "s"
    assert main(["prepare", "imagenet", "--src", str(jpeg_folder), "--out", str(out), "--vae", str(tiny_vae_dir),
                 "--image-size", "32", "--shard-size", "2", "--device", "cpu", "--no-progress"]) == 0
    ranks = [imagenet_stream(str(out), 2, seed=3, rank=r, world_size=2, shuffle_buffer=2) for r in range(2)]
    firsts = [next(iter(s)) for s in ranks]
    assert firsts[0]["latents"].shape == (2, 4, 16, 16) and firsts[0]["labels"].shape == (2,)
    assert not torch.equal(firsts[0]["latents"], firsts[1]["latents"])  # disjoint shards per rank

    stream = imagenet_stream(str(out), 2, seed=3, rank=0, world_size=1, num_workers=2, shuffle_buffer=3)
    it = iter(stream)
    run = [next(it) for _ in range(6)]  # crosses an epoch boundary (4 batches per epoch)
    again = imagenet_stream(str(out), 2, seed=3, rank=0, world_size=1, num_workers=2, shuffle_buffer=3)
    it2 = iter(again)
    [next(it2) for _ in range(3)]
    resumed = imagenet_stream(str(out), 2, seed=3, rank=0, world_size=1, num_workers=2, shuffle_buffer=3)
    resumed.load_state_dict(again.state_dict())
    rest = [b for _, b in zip(range(3), iter(resumed))]
    for a, b in zip(run[3:], rest):
        assert torch.equal(a["latents"], b["latents"]) and torch.equal(a["labels"], b["labels"])
    # latents are samples from the stored moments (scaled), not the mean itself
    assert not torch.equal(run[4]["latents"], run[0]["latents"])


def test_a_wrong_src_fails_before_the_autoencoder_loads(tmp_path, capsys):
    """A typo in --src was reported only after the autoencoder had loaded (here none exists at all)."""
    assert main(["prepare", "imagenet", "--src", str(tmp_path / "typo"), "--out", str(tmp_path / "out"),
                 "--vae", str(tmp_path / "no-vae"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--src" in err and "typo is not a directory" in err and "no-vae" not in err
