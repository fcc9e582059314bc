import json

import numpy as np
import pytest
import soundfile as sf
import torch

from selfflow.audio.modality import AudioModality
from selfflow.audio.prepare import prepare_audio
from selfflow.audio.synthetic_tones import CAPTIONS
from selfflow.core.config import load_config
from selfflow.core.registry import get_modality
from selfflow.core.trainer import Trainer

TINY = ["data.modality=audio", "model.hidden_size=32", "model.num_heads=2", "model.depth_double=1",
        "model.depth_single=2", "model.axes_dim=[4,6,6]", "train.batch_size=2", "logging.every=1",
        "sample.steps=2", "sample.num_samples=2", "ema.decay=0.9", "train.steps=2", "data.options.text.dim=8"]


def test_registered_with_paper_defaults_and_text_conditioning():
    assert get_modality("audio") is AudioModality
    assert AudioModality.default_mask_ratio == 0.5 and AudioModality.default_timesteps.shift > 1
    mod = AudioModality({"num_samples": 1024, "patch": 32, "text": {"dim": 8}})
    assert mod.context_dim == 8 and mod.num_classes == 0 and mod.token_channels == 64
    batch = next(iter(mod.stream(2, seed=0)))
    tokens, cond = mod.encode(batch, "cpu")
    assert tokens.x.shape == (2, 32, 64) and cond.context.shape[::2] == (2, 8)
    assert torch.equal(mod.sample_ids(1, "cpu")[0], tokens.ids[0])
    assert torch.equal(mod.decode(tokens.x), batch["media"])
    cond, null, _ = mod.sample_conditions(2, "cpu")
    assert not null.context_mask.any() and null.context.shape == cond.context.shape


def test_trainer_end_to_end_writes_wav(tmp_path):
    cfg = load_config(None, [*TINY, f"output_dir={tmp_path}", "name=a", "data.options.num_samples=1024",
                             "data.options.patch=32", "sample.cfg_scale=2.0"])
    result = Trainer(cfg, progress=False).fit()
    data, sr = sf.read(result["samples"])
    assert sr == 8000 and data.shape == (2 * 1024 + 2 * 2000, 2)
    assert result["samples"].with_suffix(".txt").read_text().splitlines()[1] == f"1: {CAPTIONS[1]}"


def test_one_sample_is_written_exactly_without_the_previews_gap(tmp_path):
    """``selfflow sample --out-dir`` files go to FAD, which windows every second of a file: no trailing silence."""
    mod = AudioModality({"num_samples": 1024, "patch": 32, "sample_rate": 8000})
    wave = torch.linspace(-1, 1, 1024).repeat(2, 1) * torch.tensor([[1.0], [-0.5]])  # (C, N)
    path = mod.write_sample(wave, None, tmp_path / "000003")
    data, sr = sf.read(path, dtype="float32")
    assert path == tmp_path / "000003.wav" and sr == 8000 and data.shape == (1024, 2)
    np.testing.assert_allclose(data.T, wave.numpy(), atol=1 / 32767)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000003.wav"]


def test_prepare_skips_corrupt_files_and_trains_on_latents(tmp_path, oobleck_dir, capsys):
    src = tmp_path / "audio"
    src.mkdir()
    rows = []
    for i in range(3):
        t = np.arange(12000 if i else 400) / 8000  # t0: 50 ms, shorter than the 64 ms window
        sf.write(src / f"t{i}.flac", (0.3 * np.sin(2 * np.pi * (200 + 50 * i) * t)).astype(np.float32), 8000)
        rows.append({"path": f"t{i}.flac", "caption": f"a tone number {i}"})
    (src / "bad.wav").write_bytes(b"RIFF....WAVEgarbage")
    rows.append({"path": "bad.wav", "caption": "broken"})
    (src / "list.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    opts = {"input": str(src / "list.jsonl"), "out": str(tmp_path / "shards"), "vae_dir": str(oobleck_dir),
            "seconds": 0.064, "shard_size": 2, "text": {"dim": 8}}
    report = prepare_audio(opts)
    assert {k: report[k] for k in ("written", "skipped", "shards", "existing")} == {
        "written": 3, "skipped": 1, "shards": 2, "existing": 0}
    [note] = report["notes"]
    assert note.startswith("1 file(s) shorter than the 0.064 s window: zero-padded to it (up to 0.014 s") or \
        note.startswith("1 file(s) shorter than the 0.064 s window: zero-padded to it (up to 0.013 s"), note
    from selfflow.core.cli import main  # the same target through `selfflow prepare audio`: resumes

    assert main(["prepare", "audio", "--input", str(src / "list.jsonl"), "--out", str(tmp_path / "shards"),
                 "--vae-dir", str(oobleck_dir), "--seconds", "0.064", "--shard-size", "2", "--tiny-text", "8"]) == 0
    assert "0 samples in 0 new shard(s), 2 shard(s) already done" in capsys.readouterr().out
    info = json.loads((tmp_path / "shards" / "codec.json").read_text())
    assert info["latent_shape"] == [4, 64] and info["latent_mean"] is None
    assert info["sample_captions"] == ["a tone number 0", "a tone number 1", "a tone number 2", "broken"]
    cfg = load_config(None, [*TINY, f"output_dir={tmp_path}", "name=lat", "data.options.dataset=latent_shards",
                             "data.options.codec=songbloom", f"data.options.shards={tmp_path / 'shards'}",
                             f"data.options.vae_dir={oobleck_dir}", "data.options.patch=4"])
    trainer = Trainer(cfg, progress=False)
    assert trainer.run.modalities["audio"].conditioner.sample_captions == info["sample_captions"]  # not synthetic
    tokens, cond = trainer.run.modalities["audio"].encode(next(iter(trainer.streams["audio"])), "cpu")
    assert tokens.x.shape == (2, 16, 16) and cond.context.shape[-1] == 8
    result = trainer.fit()
    assert sf.read(result["samples"])[0].shape[1] == 2
    with pytest.raises(ValueError, match=r"stores caption embeddings of tiny.*max=64 but .*max=3"):
        AudioModality({"dataset": "latent_shards", "codec": "songbloom", "shards": str(tmp_path / "shards"),
                       "vae_dir": str(oobleck_dir), "patch": 4, "text": {"dim": 8, "max_length": 3}})
    # the run and its export load and sample without the shards (moved away), with the latent statistics and
    # shape it trained on: what the modality read from them is recorded in data_facts.json and config.json
    from selfflow.core import load

    run_dir = tmp_path / "lat"
    before = load(run_dir, device="cpu").sample(n=1, steps=2, seed=0)
    (tmp_path / "shards").rename(tmp_path / "moved")
    for source in (run_dir, run_dir / "pretrained"):
        assert torch.equal(load(source, device="cpu").sample(n=1, steps=2, seed=0), before), source


def test_shapes_only_takes_the_published_oobleck_vae_and_the_default_prepared_clip(tmp_path):

    from selfflow.core.codec import shapes_only

    options = {"dataset": "latent_shards", "codec": "songbloom", "shards": str(tmp_path / "none")}
    with pytest.raises(FileNotFoundError, match=r"codec\.json not found"):
        AudioModality(options)
    with shapes_only():
        songbloom = AudioModality(options)
        stable = AudioModality({**options, "codec": "stable_audio"})
    # 10 s (`selfflow prepare audio`'s default, the paper's) at 48 kHz / hop 1920; 44.1 kHz / 2048
    assert (songbloom.channels, songbloom.length, songbloom.sample_rate) == (64, 250, 48000)
    assert (stable.channels, stable.length) == (64, 441000 // 2048)


@pytest.mark.parametrize(("patch", "frames_per_token", "warned"), [(64, 1, True), (4, 1, True), (5, 5, False)])
def test_a_latent_patch_that_does_not_divide_the_clip_is_one_frame_and_says_so(tmp_path, caplog, patch,
                                                                               frames_per_token, warned):
    # The default 64 (the waveform's) never divides the paper's 250-frame clip: it used to fall back to 1 silently.
    from selfflow.core.codec import shapes_only

    with shapes_only(), caplog.at_level("WARNING"):
        mod = AudioModality({"dataset": "latent_shards", "codec": "songbloom", "shards": str(tmp_path / "none"),
                             "patch": patch})
    assert mod.patch == frames_per_token and mod.sample_ids(1, "cpu").shape[1] == 250 // frames_per_token
    assert (f"data.options.patch={patch} does not divide the 250 latent frames" in caplog.text) == warned
    if warned:
        assert "[1, 2, 5, 10, 25, 50, 125, 250]" in caplog.text


def test_shards_of_another_codec_or_modality_are_refused_naming_codec_json(tmp_path):
    (tmp_path / "codec.json").write_text(json.dumps({"kind": "songbloom", "latent_shape": [64, 40],
                                                      "latent_mean": [0.0] * 64, "latent_std": [1.0] * 64}))
    with pytest.raises(ValueError, match=r"holds songbloom latents \(codec\.json kind\), but data\.options\.codec is "
                                         r"stable_audio"):
        AudioModality({"dataset": "latent_shards", "codec": "stable_audio", "shards": str(tmp_path)})
    (tmp_path / "codec.json").write_text(json.dumps({"version": "wan2.2", "latent_shape": [48, 3, 2, 4]}))
    with pytest.raises(ValueError, match=r"not the 2-D latents of `selfflow prepare audio`"):
        AudioModality({"dataset": "latent_shards", "codec": "songbloom", "shards": str(tmp_path)})
