"""``selfflow prepare image-text`` on a generated captioned folder / manifest; training on the shards."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from selfflow.core.cli import main
from selfflow.core.config import load_config
from selfflow.core.metrics import read_metrics
from selfflow.core.trainer import Trainer
from selfflow.image.modality import ImageModality
from selfflow.image.prepare_image_text import load_image, prepare_image_text
from selfflow.image.sd_vae import SDVAE
from selfflow.text.tiny import TinyTextEncoder

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny" / "image_text.yaml"
CAPTIONS = ["a red square", "a green circle", "a blue triangle", "a yellow square", "a red circle"]


@pytest.fixture(scope="module")
def captioned_folder(tmp_path_factory):
    """5 images (PNG and JPEG, various sizes) with captions beside them, one image without a caption, one
    corrupt JPEG; and a JSON-lines manifest over the same files."""
    root = tmp_path_factory.mktemp("captioned")
    rng = np.random.default_rng(0)
    rows = []
    for i, caption in enumerate([*CAPTIONS, None]):
        h, w = int(rng.integers(36, 70)), int(rng.integers(36, 70))
        arr = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        name = f"img{i}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(arr).save(root / name)
        if caption is not None:
            (root / name).with_suffix(".txt").write_text(caption + "\n")
        rows.append({"file": name, "caption": caption})
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    rows.append({"path": "broken.jpg", "caption": "broken"})
    manifest = root / "captions.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _samples(out: Path) -> list[dict]:
    return [s for shard in sorted(out.glob("*.tar")) for s in wds.WebDataset(str(shard), shardshuffle=False,
                                                                               empty_check=False)]


def test_prepare_folder_with_sd_vae_then_train_and_sample(captioned_folder, tiny_vae_dir, tmp_path, capsys):
    out = tmp_path / "shards"
    args = ["prepare", "image-text", "--input", str(captioned_folder), "--out", str(out), "--codec", "sd-vae",
            "--vae-dir", str(tiny_vae_dir), "--image-size", "32", "--shard-size", "3", "--tiny-text", "8"]
    assert main(args) == 0
    assert "6 samples in 3 new shard(s), 0 shard(s) already done, 1 unreadable file(s) skipped" in \
        capsys.readouterr().out
    info = json.loads((out / "codec.json").read_text())
    assert info["codec"] == "sd_vae" and info["latent_shape"] == [4, 16, 16] and info["text"]["dim"] == 8
    assert info["sample_captions"] == CAPTIONS
    failed = [f for r in sorted(out.glob("image-*.json")) for f in json.loads(r.read_text())["skipped"]]
    assert [Path(f["item"]).name for f in failed] == ["broken.jpg"]

    vae, enc = SDVAE.from_pretrained(tiny_vae_dir), TinyTextEncoder(8, 64)
    samples = _samples(out)
    assert len(samples) == 6
    for s in samples:
        src = Path(json.loads(s["json"])["source"])
        caption = s["txt"].decode()
        assert caption == (src.with_suffix(".txt").read_text().strip() if src.with_suffix(".txt").is_file() else "")
        stored = np.load(io.BytesIO(s["latent.npy"]))
        assert stored.dtype == np.float16 and stored.shape == (4, 16, 16)
        direct = vae.encode(load_image(str(src), 32)[None])[0].numpy()  # scaled posterior mean
        assert np.allclose(stored, direct, atol=2e-3, rtol=1e-3)
        emb = np.load(io.BytesIO(s["emb.npy"]))
        assert np.allclose(emb, enc.encode_unpadded([caption])[0].numpy(), atol=1e-2)

    assert main(args) == 0  # resumable: every shard is done
    assert "0 samples in 0 new shard(s), 3 shard(s) already done" in capsys.readouterr().out

    sets = [f"output_dir={tmp_path}", "name=it", "train.steps=2", "train.batch_size=2", "train.num_threads=1",
            "sample.num_samples=2", "sample.steps=2", f"data.options.shards={out}", "data.options.codec=sd_vae",
            f"data.options.vae_path={tiny_vae_dir}", "data.options.patch_size=2", "data.options.text.dim=8"]
    trainer = Trainer(load_config(CONFIG, sets), progress=False)
    assert trainer.run.model_config.context_dim == 8 and trainer.run.modalities["image"].num_classes == 0
    batch = next(iter(trainer.streams["image"]))
    assert batch["latent"].shape == (2, 4, 16, 16) and len(batch["emb"]) == 2 and len(batch["captions"]) == 2
    result = trainer.fit()
    assert result["samples"].is_file() and np.isfinite(result["last"]["loss"])
    # the run samples again from its directory (captions from codec.json, CFG against the empty caption)
    grid = tmp_path / "again.png"
    assert main(["sample", "--run", str(tmp_path / "it"), "--num", "2", "--steps", "2", "--cfg-scale", "2",
                 "--out", str(grid), "--device", "cpu"]) == 0
    assert grid.is_file()


def test_manifest_with_pixels_trains_and_checks_its_inputs(captioned_folder, tmp_path):
    out = tmp_path / "px"
    opts = {"input": str(captioned_folder / "captions.jsonl"), "out": str(out), "codec": "pixel",
            "image_size": 16, "shard_size": 4, "text": {"kind": "tiny", "dim": 8}}
    assert prepare_image_text(opts) == {"written": 6, "skipped": 1, "shards": 2, "existing": 0}
    # two ranks write disjoint shards whose union is the single-rank output
    split = tmp_path / "split"
    reports = [prepare_image_text({**opts, "out": str(split), "rank": r, "world_size": 2}) for r in (1, 0)]
    assert [r["shards"] for r in reports] == [1, 1] and sum(r["written"] for r in reports) == 6
    for a, b in zip(_samples(out), _samples(split)):
        assert a["__key__"] == b["__key__"] and a["latent.npy"] == b["latent.npy"] and a["emb.npy"] == b["emb.npy"]
    s = next(s for s in _samples(out) if json.loads(s["json"])["source"].endswith("img0.jpg"))  # shards mix
    px = np.load(io.BytesIO(s["latent.npy"]))
    assert px.shape == (3, 16, 16)
    assert np.allclose(px, load_image(str(captioned_folder / "img0.jpg"), 16).numpy(), atol=1e-3)

    sets = [f"output_dir={tmp_path}", "name=px", "train.steps=2", "train.batch_size=2", "train.num_threads=1",
            "sample.num_samples=2", "sample.steps=2", f"data.options.shards={out}", "data.options.image_size=16",
            "data.options.text.dim=8"]
    result = Trainer(load_config(CONFIG, sets), progress=False).fit()
    assert result["samples"].is_file()

    base = {"dataset": "image_text_shards", "shards": str(out), "image_size": 16, "text": {"dim": 8}}
    mod = ImageModality(base)
    tk, cond = mod.encode(next(iter(mod.stream(2, seed=0))), "cpu")
    assert tk.x.shape == (2, 16, 48) and cond.context.shape[::2] == (2, 8) and cond.context_mask.any()
    with pytest.raises(ValueError, match="image_size to the prepared size \\(16\\)"):
        ImageModality({**base, "image_size": 32})
    with pytest.raises(ValueError, match="caption embeddings of tiny"):
        ImageModality({**base, "text": {"dim": 16}})
    with pytest.raises(ValueError, match=r"holds pixel latents but data\.options\.codec is sd_vae"):
        ImageModality({**base, "codec": "sd_vae", "vae_path": "x"})
    with pytest.raises(FileNotFoundError, match="prepare image-text"):
        ImageModality({**base, "shards": str(tmp_path)})


def test_non_utf8_caption_and_over_large_image_are_skipped_and_listed(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(src / "good.png")
    (src / "good.txt").write_text("a black square")
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(src / "latin1.png")
    (src / "latin1.txt").write_bytes(b"caf\xe9")
    Image.new("1", (12000, 12000)).save(src / "huge.png")  # PIL alone only warns, then decodes 430 MB
    out = tmp_path / "out"
    report = prepare_image_text({"input": str(src), "out": str(out), "codec": "pixel", "image_size": 16})
    assert report == {"written": 1, "skipped": 2, "shards": 1, "existing": 0}
    skipped = {Path(s["item"]).name: s["error"] for s in json.loads((out / "image-000000.json").read_text())["skipped"]}
    assert "latin1.txt is not UTF-8" in skipped["latin1.png"] and "too large" in skipped["huge.png"]
    assert json.loads((out / "codec.json").read_text())["sample_captions"] == ["a black square"]


def test_images_without_captions_are_counted_in_a_warning(tmp_path, caplog):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("a", "b", "c"):
        Image.new("RGB", (40, 40), (40, 80, 120)).save(src / f"{name}.png")
    (src / "a.txt").write_text("a blue square")
    with caplog.at_level("WARNING"):
        report = prepare_image_text({"input": str(src), "out": str(tmp_path / "out"), "codec": "pixel",
                                     "image_size": 32})
    assert report["written"] == 3
    assert "2 of 3 images have no caption" in caplog.text


def test_a_run_on_shards_resumes_on_another_split_only_when_asked(captioned_folder, tmp_path, capsys):
    """`selfflow train` on shards resumed with another batch per rank is refused, saying how to go on; with
    --resplit-data it goes on from the shards' next epoch, and says so in train.log."""
    out = tmp_path / "px"
    prepare_image_text({"input": str(captioned_folder), "out": str(out), "codec": "pixel", "image_size": 16,
                        "shard_size": 4, "text": {"kind": "tiny", "dim": 8}})
    sets = [f"output_dir={tmp_path}", "name=r", "train.num_threads=1", "logging.every=1", "sample.num_samples=2",
            "sample.steps=2",
            f"data.options.shards={out}", "data.options.image_size=16", "data.options.text.dim=8"]
    argv = ["train", "--no-progress", "--config", str(CONFIG), *(a for s in sets for a in ("--set", s))]
    assert main([*argv, "--set", "train.steps=2", "--set", "train.batch_size=2"]) == 0
    capsys.readouterr()
    resumed = [*argv, "--set", "train.steps=4", "--set", "train.batch_size=1"]
    assert main(resumed) == 2
    err = capsys.readouterr().err
    assert "split otherwise (was 1×2, 0 workers; now 1×1, 0 workers)" in err and "--resplit-data" in err
    assert main([*resumed, "--resplit-data"]) == 0
    assert [r["step"] for r in read_metrics(tmp_path / "r" / "metrics.jsonl")] == [1, 2, 3, 4]
    log = (tmp_path / "r" / "train.log").read_text()
    assert "--resplit-data: it goes on from the start of epoch 1 on this split" in log
