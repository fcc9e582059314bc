import json

import numpy as np
import pytest
import torch

from selfflow.core.config import load_config
from selfflow.core.metrics import read_metrics
from selfflow.core.registry import get_modality
from selfflow.core.trainer import Trainer
from selfflow.video.modality import VideoModality
from selfflow.video.prepare import prepare_video
from selfflow.video.synthetic_moving_shapes import CAPTIONS

from .conftest import moving_bar_video

TINY = ["data.modality=video", "model.hidden_size=32", "model.num_heads=2", "model.depth_double=1",
        "model.depth_single=2", "model.axes_dim=[4,6,6]", "train.batch_size=2", "logging.every=1",
        "sample.steps=2", "sample.num_samples=2", "ema.decay=0.9", "train.steps=2"]


def test_registered_with_paper_defaults():
    assert get_modality("video") is VideoModality
    assert VideoModality.default_mask_ratio == 0.1
    ts = VideoModality.default_timesteps
    assert ts.kind == "logit_normal" and ts.shift > 1


def test_stream_tokens_and_round_trip():
    mod = VideoModality({"frames": 4, "image_size": 16})
    s = mod.stream(2, seed=0)
    it = iter(s)
    next(it)
    state = s.state_dict()
    expected = next(it)
    s2 = mod.stream(2, seed=0)
    s2.load_state_dict(state)
    assert torch.equal(next(iter(s2))["media"], expected["media"])
    tokens, cond = mod.encode(expected, "cpu")
    assert tokens.x.shape == (2, 2 * 4 * 4, 3 * 2 * 4 * 4) and mod.token_channels == 96
    assert tokens.ids[0, 16].tolist() == [1, 0, 0]  # (t, h, w) of the patch grid
    assert torch.equal(cond.labels, expected["labels"]) and mod.num_classes == len(CAPTIONS)
    assert torch.equal(mod.decode(tokens.x), expected["media"])
    assert mod.sample_ids(3, "cpu").shape == (3, 32, 3)


def test_text_conditioning_and_null_context():
    mod = VideoModality({"frames": 4, "image_size": 16, "conditioning": "text", "text": {"dim": 8}})
    assert mod.context_dim == 8 and mod.num_classes == 0
    batch = next(iter(mod.stream(2, seed=0)))
    _, cond = mod.encode(batch, "cpu")
    n_words = [len(c.split()) for c in batch["captions"]]
    assert cond.context.shape == (2, max(n_words), 8) and cond.context_mask.sum(1).tolist() == n_words
    cond, null, labels = mod.sample_conditions(3, "cpu")
    assert labels.tolist() == [0, 1, 2] and null.context.shape == cond.context.shape
    assert not null.context_mask.any() and (null.context == 0).all()


def test_samples_are_written_as_mp4_and_gif(tmp_path):
    import av

    mod = VideoModality({"frames": 4, "image_size": 16})
    batch = next(iter(mod.stream(3, seed=0)))
    path = mod.save_samples(batch["media"], batch["labels"], tmp_path / "s")
    assert path.suffix == ".mp4" and path.with_suffix(".gif").is_file()
    with av.open(str(path)) as c:
        assert sum(1 for _ in c.decode(video=0)) == 4
    assert path.with_suffix(".txt").read_text().splitlines()[0] == f"0: {CAPTIONS[int(batch['labels'][0])]}"


def test_one_sample_is_written_exactly_as_the_fvd_reader_reads_it(tmp_path):
    """``selfflow sample --out-dir`` files go to FVD: the clip's own frames, not the tiled, 2×, bordered MP4."""
    from selfflow.eval.video_io import list_videos, read_video

    mod = VideoModality({"frames": 6, "image_size": 16})
    clip = torch.rand(3, 6, 16, 16) * 2.2 - 1.1  # out of range on purpose: clamped like the previews
    path = mod.write_sample(clip, 0, tmp_path / "000000")
    assert path == tmp_path / "000000.npy" and list_videos(tmp_path) == [path]
    frames = read_video(path)
    assert frames.shape == (6, 16, 16, 3)
    expected = ((clip.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
    np.testing.assert_array_equal(frames, expected)


@pytest.mark.parametrize("conditioning", ["class", "text"])
def test_trainer_end_to_end(tmp_path, conditioning):
    cfg = load_config(None, [*TINY, f"output_dir={tmp_path}", "name=v", "data.options.frames=4",
                             "data.options.image_size=16", f"data.options.conditioning={conditioning}",
                             "data.options.text.dim=8", "sample.cfg_scale=2.0"])
    trainer = Trainer(cfg, progress=False)
    assert trainer.run.model_config.context_dim == (8 if conditioning == "text" else 0)
    result = trainer.fit()
    assert result["samples"].suffix == ".mp4" and result["samples"].is_file()
    assert all(np.isfinite(r["loss"]) for r in read_metrics(tmp_path / "v" / "metrics.jsonl"))


def test_prepare_shards_and_train_on_latents(tmp_path, wan_dir):
    src = tmp_path / "videos"
    for i in range(3):
        moving_bar_video(src / f"clip{i}.mp4", frames=3 if i == 0 else 12, shift=i)  # clip0: shorter than a clip
        (src / f"clip{i}.txt").write_text(f"a bar moving right {i}")
    (src / "broken.mp4").write_bytes(b"not a video at all")
    opts = {"input": str(src), "out": str(tmp_path / "shards"), "vae_dir": str(wan_dir), "shard_size": 2,
            "clip": {"frames": 5, "height": 32, "width": 32}, "text": {"dim": 8}}
    report = prepare_video(opts)
    assert report == {"written": 3, "skipped": 1, "shards": 2, "existing": 0, "notes": [
        "1 video(s) shorter than the clip (5 frames): their last frame repeats (up to 2 times; repeated_frames in "
        "their samples' info)"]}
    assert prepare_video(opts)["existing"] == 2  # resumable: complete shards are not redone
    info = json.loads((tmp_path / "shards" / "codec.json").read_text())
    assert info["latent_shape"] == [4, 2, 2, 2]
    assert info["sample_captions"] == [f"a bar moving right {i}" for i in range(3)]
    failed = json.loads((tmp_path / "shards" / "video-000000.json").read_text())["skipped"]
    assert [f["item"].endswith("broken.mp4") for f in failed] == [True]
    cfg = load_config(None, [*TINY, f"output_dir={tmp_path}", "name=lat", "data.options.dataset=latent_shards",
                             "data.options.codec=wan2.2", f"data.options.shards={tmp_path / 'shards'}",
                             f"data.options.vae_dir={wan_dir}", "data.options.text.dim=8",
                             "data.options.patch=[1,1,1]"])
    trainer = Trainer(cfg, progress=False)
    # previews prompt with the shards' own captions (they used the synthetic "a red circle …")
    assert trainer.run.modalities["video"].conditioner.sample_captions == info["sample_captions"]
    batch = next(iter(trainer.streams["video"]))
    assert batch["latent"].shape == (2, 4, 2, 2, 2) and len(batch["emb"]) == 2
    result = trainer.fit()
    assert result["samples"].is_file()
    base = {"dataset": "latent_shards", "codec": "wan2.2", "shards": str(tmp_path / "shards"),
            "vae_dir": str(wan_dir), "patch": [1, 1, 1]}
    with pytest.raises(ValueError, match=r"stores caption embeddings of tiny.*max=64 but .*max=3"):
        VideoModality({**base, "text": {"dim": 8, "max_length": 3}})  # same width, another encoder


def test_shapes_only_takes_the_published_wan_vae_and_the_default_prepared_clip(tmp_path):
    """What `selfflow plan` builds before anything is downloaded; outside shapes_only the shards are required."""
    from selfflow.core.codec import shapes_only

    options = {"dataset": "latent_shards", "codec": "wan2.2", "shards": str(tmp_path / "none"),
               "vae_dir": str(tmp_path / "vae")}
    with pytest.raises(FileNotFoundError, match=r"codec\.json not found"):
        VideoModality(options)
    with shapes_only():
        wan22 = VideoModality(options)
        wan21 = VideoModality({**options, "codec": "wan2.1"})
    # 45 frames at 192×320 (ClipSpec's defaults, the paper's): Wan2.2 (4, 16, 16) → 12×12×20, Wan2.1 (4, 8, 8)
    assert wan22.latent_shape == (48, 12, 12, 20) and wan22.grid == (12, 6, 10) and wan22.token_channels == 192
    assert wan21.latent_shape == (16, 12, 24, 40)
    with shapes_only(), pytest.raises(RuntimeError, match="only its shape is known"):
        wan22.wan.encode(torch.zeros(1, 3, 5, 32, 32))


def test_shards_of_another_codec_or_modality_are_refused_naming_codec_json(tmp_path):
    """Wan 2.2 shards read with codec wan2.1 trained and sampled at the wrong size; audio shards read as video
    failed with "not enough values to unpack"."""
    (tmp_path / "codec.json").write_text(json.dumps({"version": "wan2.2", "latent_shape": [48, 3, 2, 4]}))
    with pytest.raises(ValueError, match=r"holds wan2\.2 latents \(codec\.json version\), but data\.options\.codec "
                                         r"is wan2\.1: set codec: wan2\.2"):
        VideoModality({"dataset": "latent_shards", "codec": "wan2.1", "shards": str(tmp_path)})
    (tmp_path / "codec.json").write_text(json.dumps({"kind": "songbloom", "latent_shape": [64, 40]}))
    with pytest.raises(ValueError, match=r"holds latents of shape \[64, 40\] \(codec\.json\), not the 4-D latents "
                                         r"of `selfflow prepare video`"):
        VideoModality({"dataset": "latent_shards", "codec": "wan2.2", "shards": str(tmp_path)})


def test_the_fvd_hint_names_the_frames_of_short_samples(tmp_path):
    """FVD's clips are 16 frames: the printed command failed as written on the tiny runs' 8-frame samples."""
    short = VideoModality({"frames": 8, "image_size": 16}).evaluation_hint(tmp_path, None, False)
    assert short.endswith("--i3d i3d_torchscript.pt --frames 8")
    assert "--frames" not in VideoModality({"frames": 16, "image_size": 16}).evaluation_hint(tmp_path, None, False)


def test_a_pixel_patch_on_latent_shards_is_named(tmp_path):
    """The tiny config's pixel patch (2, 4, 4) on a (3, 2, 4) latent made no token: "sample_ids … got (1, 0, 3)"."""
    (tmp_path / "codec.json").write_text(json.dumps({"version": "wan2.2", "latent_shape": [48, 3, 2, 4]}))
    options = {"dataset": "latent_shards", "codec": "wan2.2", "shards": str(tmp_path)}
    with pytest.raises(ValueError, match=r"data\.options\.patch \[2, 4, 4\] does not divide the shards' latent "
                                         r"\(T, H, W\) = \(3, 2, 4\) \(codec\.json\): e\.g\. patch \[1, 2, 2\]"):
        VideoModality({**options, "patch": [2, 4, 4]})
    assert VideoModality({**options, "patch": [1, 2, 2]}).grid == (3, 1, 2)
