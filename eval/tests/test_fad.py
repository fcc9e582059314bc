"""FAD (fadtk protocol) with tiny random transformers CLAP models; windowing on synthetic signals."""

from __future__ import annotations

import argparse
import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from selfflow.eval import clap, fad
from selfflow.eval.audio_io import write_wav
from selfflow.eval.cli_media import add_fad_parser
from selfflow.eval.frechet import frechet_distance

TINY_AUDIO = {"patch_embeds_hidden_size": 8, "depths": [1, 1, 1, 1], "hidden_size": 64,
              "num_attention_heads": [1, 1, 2, 2], "window_size": 8, "spec_size": 256,
              "num_mel_bins": 64, "enable_fusion": False}


def tiny_clap_model(seed: int = 0):
    from transformers import ClapConfig, ClapModel

    torch.manual_seed(seed)
    cfg = ClapConfig(text_config={"vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 1,
                                  "num_attention_heads": 1, "intermediate_size": 32,
                                  "max_position_embeddings": 40},
                     audio_config=TINY_AUDIO, projection_dim=16)
    model = ClapModel(cfg).eval()
    with torch.no_grad():  # non-trivial BatchNorm buffers on the mel input
        bn = model.audio_model.audio_encoder.batch_norm
        bn.running_mean.normal_(-20, 5)
        bn.running_var.uniform_(50, 150)
    return model


@pytest.fixture(scope="module")
def laion_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("clap_a")
    tiny_clap_model().save_pretrained(str(path))
    return str(path)


def tone(seconds: float, rate: int, freq: float, amp: float = 0.5, seed: int = 0) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    noise = np.random.default_rng(seed).normal(0, 0.05, len(t))
    return amp * np.sin(2 * math.pi * freq * t) + noise


# ---------------------------------------------------------------------------------------------
# signal path


def test_windows_follow_fadtk_hop_and_zero_padding() -> None:
    rate = 48_000
    x = np.random.default_rng(0).uniform(-1, 1, 10 * rate).astype(np.float32)
    w = fad.windows(x, rate, 10, 1)
    assert w.shape == (10, 10 * rate)  # a 10 s clip gives 10 windows
    np.testing.assert_array_equal(w[0], x)
    for i in range(1, 10):  # window i: x[i s:] then zeros
        np.testing.assert_array_equal(w[i, : (10 - i) * rate], x[i * rate:])
        assert not w[i, (10 - i) * rate:].any()
    for seconds, n in [(0.5, 1), (1.0, 1), (1.0 + 1 / rate, 2), (10.5, 11), (23.2, 24)]:
        assert len(fad.windows(np.ones(round(seconds * rate)), rate, 10, 1)) == n
    assert len(fad.windows(np.ones(0), rate, 10, 1)) == 0
    short = fad.windows(np.arange(1, 8, dtype=np.float64), 2, 3, 1)  # rate 2: windows of 6, hop 2
    np.testing.assert_array_equal(short, [[1, 2, 3, 4, 5, 6], [3, 4, 5, 6, 7, 0],
                                          [5, 6, 7, 0, 0, 0], [7, 0, 0, 0, 0, 0]])
    ms = fad.windows(np.ones(3 * 44_100), 44_100, 7, 1)  # MS-CLAP: 7 s windows at 44.1 kHz
    assert ms.shape == (3, 7 * 44_100) and ms[2, :44_100].all() and not ms[2, 44_100:].any()


def test_quantisation_steps() -> None:
    x = np.array([0.5, -0.5, 1.7, -1.2, 1e-6, 0.99999])
    np.testing.assert_array_equal(fad.laion_int16(x) * 32767,
                                  [16383, -16383, 32767, -32767, 0, 32766])  # cast truncates
    np.testing.assert_array_equal(fad.pcm16(x) * 32768, [16384, -16384, 32767, -32768, 0, 32767])  # clipped


def test_prepare_mono_resample_and_quantise() -> None:
    import torchaudio.functional as AF

    v = clap.VARIANTS["clap_a"]
    left, right = tone(0.5, 44_100, 440), tone(0.5, 44_100, 660, seed=1)
    out = fad.prepare(np.stack([left, right]), 44_100, v)
    mono = torch.from_numpy((left + right) / 2)
    ref = AF.resample(mono, 44_100, 48_000, lowpass_filter_width=64, rolloff=0.9475937167399596,
                      resampling_method="sinc_interp_kaiser", beta=14.769656459379492).numpy()
    ref = (np.clip(np.round(ref * 32768), -32768, 32767) / 32768 * 32767).astype(np.int16) / 32767
    assert len(out) == 24_000
    np.testing.assert_array_equal(out, ref)
    with pytest.raises(ValueError, match=r"\(T, channels\)\? transpose"):  # soundfile's layout
        fad.prepare(np.stack([left, right]).T, 44_100, v)
    plain = AF.resample(mono, 44_100, 48_000).numpy()  # torchaudio's default filter differs
    assert np.abs(plain - ref).max() > 1e-4
    ms = fad.prepare(left, 44_100, clap.VARIANTS["clap"])  # MS-CLAP: native rate, no int16 trip
    np.testing.assert_array_equal(ms, np.clip(np.round(left * 32768), -32768, 32767) / 32768)


# ---------------------------------------------------------------------------------------------
# CLAP embeddings and FAD


def _direct_embeddings(model, wins: np.ndarray) -> np.ndarray:
    from transformers import ClapFeatureExtractor

    fe = ClapFeatureExtractor(feature_size=64, sampling_rate=48_000, hop_length=480, max_length_s=10,
                              fft_window_size=1024, frequency_min=50, frequency_max=14_000,
                              truncation="rand_trunc")
    feats = fe(list(wins), sampling_rate=48_000, return_tensors="pt")
    assert not feats["is_longer"].any()
    with torch.no_grad():
        out = model.get_audio_features(input_features=feats["input_features"])
    out = out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers 4 / 5
    return F.normalize(out, dim=-1).double().numpy()


def test_fad_with_laion_clap_matches_direct_computation(laion_dir: str, tmp_path) -> None:
    real = [(tone(s, 44_100, f, seed=i), 44_100) for i, (s, f) in enumerate([(2.0, 440), (1.2, 880), (1.5, 220)])]
    fake = [(tone(s, 48_000, f, amp=0.9, seed=10 + i), 48_000)
            for i, (s, f) in enumerate([(1.0, 3000), (1.5, 5000), (1.2, 4000)])]
    emb = clap.load_clap(laion_dir, "clap_a")
    res = fad.fad(fake, real, emb, batch_size=4, progress=False, save_real_stats=tmp_path / "r.npz")
    assert set(res) >= {"fad_clap_a", "protocol", "weights", "n_fake_windows", "n_real_windows"}
    assert res["n_real_windows"] == 2 + 2 + 2 and res["n_fake_windows"] == 1 + 2 + 2
    model = tiny_clap_model()  # same seed: the same weights as laion_dir

    def all_windows(items):
        return np.concatenate([fad.windows(fad.prepare(a, r, emb.variant), 48_000, 10, 1) for a, r in items])

    er = _direct_embeddings(model, all_windows(real)).astype(np.float16).astype(np.float64)
    ef = _direct_embeddings(model, all_windows(fake)).astype(np.float16).astype(np.float64)
    assert er.std(0).max() > 1e-3
    expected = frechet_distance(ef.mean(0), np.cov(ef, rowvar=False), er.mean(0), np.cov(er, rowvar=False))
    assert expected > 1e-3
    assert res["fad_clap_a"] == pytest.approx(expected, rel=1e-6)
    same = fad.fad(real, real, emb, progress=False)["fad_clap_a"]
    assert abs(same) < 1e-6 * expected
    again = fad.fad(fake, tmp_path / "r.npz", emb, progress=False)["fad_clap_a"]
    assert again == pytest.approx(res["fad_clap_a"], rel=1e-9)
    # fadtk reference-statistics layout (<fadtk name>.mu / .cov)
    np.savez(tmp_path / "ref.npz", **{"clap-laion-audio.mu": er.mean(0),
                                      "clap-laion-audio.cov": np.cov(er, rowvar=False)})
    ref = fad.fad(fake, tmp_path / "ref.npz", emb, progress=False)["fad_clap_a"]
    assert ref == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# conversion of original checkpoints


def to_htsat_names(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of the conversion, written from the HTS-AT module names (norm1, attn.qkv,
    attn.proj, norm2, mlp.fc1/fc2, bn0, ...): what an original checkpoint stores."""
    out: dict[str, torch.Tensor] = {}
    for key, value in hf_state.items():
        if not key.startswith("audio_encoder.") or key.endswith("num_batches_tracked"):
            continue
        k = key.removeprefix("audio_encoder.")
        if ".attention.self.key." in k or ".attention.self.value." in k:
            continue
        if ".attention.self.query." in k:
            parts = [hf_state[key.replace("query", n)] for n in ("query", "key", "value")]
            out[k.replace("attention.self.query", "attn.qkv")] = torch.cat(parts)
            continue
        k = (k.replace("attention.self.", "attn.").replace("attention.output.dense", "attn.proj")
              .replace("layernorm_before", "norm1").replace("layernorm_after", "norm2")
              .replace("intermediate.dense", "mlp.fc1").replace("output.dense", "mlp.fc2")
              .replace("batch_norm", "bn0"))
        out[k] = value
    return out


@pytest.mark.parametrize("variant", ["clap_a", "clap"])
def test_convert_original_checkpoint(variant: str, tmp_path) -> None:
    from transformers import ClapAudioConfig, ClapAudioModel
    from transformers.models.clap.modeling_clap import ClapProjectionLayer

    v = clap.VARIANTS[variant]
    torch.manual_seed(1)
    audio = ClapAudioModel(ClapAudioConfig(**TINY_AUDIO)).eval()
    if v.projection == "mlp":
        cfg = ClapAudioConfig(**TINY_AUDIO, projection_dim=16)
        proj = ClapProjectionLayer(cfg).eval()
        proj_state = {"0.weight": proj.linear1.weight, "0.bias": proj.linear1.bias,
                      "2.weight": proj.linear2.weight, "2.bias": proj.linear2.bias}
    else:
        proj = clap.MSClapProjection(64, 24).eval()
        with torch.no_grad():
            proj.layer_norm.weight.uniform_(0.5, 1.5)
        proj_state = proj.state_dict()
    tower_prefix, proj_prefix = clap.PREFIXES[v.projection]
    state = {tower_prefix + k: t for k, t in to_htsat_names(audio.state_dict()).items()}
    state.update({proj_prefix + k: t for k, t in proj_state.items()})
    mel = clap.make_feature_extractor(v).mel_filters_slaney
    state[tower_prefix + "logmel_extractor.melW"] = torch.from_numpy(mel).float()
    state[tower_prefix + "spectrogram_extractor.stft.conv_real.weight"] = torch.zeros(513, 1, 1024)
    state[tower_prefix + "tscam_conv.weight"] = torch.zeros(527, 64, 2, 3)
    state[tower_prefix + "head.weight"] = torch.zeros(527, 527)
    state[tower_prefix + "layers.0.blocks.0.attn_mask"] = torch.zeros(1)
    src = tmp_path / v.checkpoint
    if v.projection == "mlp":  # LAION: {"state_dict": {"module.…"}}
        torch.save({"state_dict": {"module." + k: t for k, t in state.items()}, "epoch": 15}, src)
    else:  # MS-CLAP: {"model": {…}}
        torch.save({"model": state}, src)

    with pytest.warns(UserWarning, match="HTS-AT sizes"):  # tiny, not HTSAT-tiny
        out = clap.convert_checkpoint(src, tmp_path / "converted", variant)
    emb = clap.load_clap(out, variant)
    rate = v.sample_rate
    wins = fad.windows(fad.prepare(tone(3.0, rate, 700), rate, v), rate, v.window_s, v.hop_s)
    ours = emb(wins)
    feats = clap.make_feature_extractor(v)(list(wins), sampling_rate=rate, return_tensors="pt")
    with torch.no_grad():
        ref = proj(audio(input_features=feats["input_features"]).pooler_output)
        ref = F.normalize(ref, dim=-1) if v.normalize else ref
    assert ours.shape == (3, 16 if v.projection == "mlp" else 24)
    np.testing.assert_allclose(ours, ref.double().numpy(), rtol=1e-5, atol=1e-6)
    if not v.normalize:
        assert not np.allclose(np.linalg.norm(ours, axis=1), 1.0)

    # a checkpoint whose mel filterbank disagrees with the front-end is refused
    state[tower_prefix + "logmel_extractor.melW"] = torch.from_numpy(mel[::-1].copy()).float()
    torch.save({"model": state}, src)
    with pytest.raises(ValueError, match="mel filterbank"):
        clap.convert_checkpoint(src, tmp_path / "bad", variant)


def test_fad_cli_and_missing_weights(laion_dir: str, tmp_path) -> None:
    real_dir, fake_dir = tmp_path / "real", tmp_path / "fake"
    real_dir.mkdir()
    fake_dir.mkdir()
    for i in range(3):
        write_wav(real_dir / f"{i}.wav", tone(1.5, 32_000, 300 + 100 * i, seed=i), 32_000)
        write_wav(fake_dir / f"{i}.wav", tone(1.0, 48_000, 2000 + 500 * i, seed=5 + i), 48_000)
    parser = argparse.ArgumentParser()
    add_fad_parser(parser.add_subparsers())
    out = tmp_path / "res.json"
    args = parser.parse_args(["fad", "--fake", str(fake_dir), "--real", str(real_dir),
                              "--clap-a", laion_dir, "--out", str(out)])
    assert args.func(args) == 0
    res = json.loads(out.read_text())["fad_clap_a"]
    assert res["n_real_windows"] == 6 and res["n_fake_windows"] == 3
    direct = fad.fad(fake_dir, real_dir, laion_dir, "clap_a", progress=False)["fad_clap_a"]
    assert res["fad_clap_a"] == pytest.approx(direct, rel=1e-9) and direct > 0
    help_text = add_fad_parser(argparse.ArgumentParser().add_subparsers()).format_help()
    for v in clap.VARIANTS.values():
        assert v.checkpoint in help_text and v.paper_name in help_text
    with pytest.raises(FileNotFoundError, match=r"config\.json.*630k-audioset-best\.pt.*lukewys"):
        clap.load_clap(tmp_path / "nothing", "clap_a")
    (tmp_path / "630k-audioset-best.pt").write_bytes(b"x")  # the published file, not converted
    with pytest.raises(ValueError, match=r"630k-audioset-best\.pt is a file; CLAP weights are a directory\. .*"
                                         r"--convert-from"):
        clap.load_clap(tmp_path / "630k-audioset-best.pt", "clap_a")
    write_wav(fake_dir / "step_00000040.wav", tone(1.0, 48_000, 900), 48_000)  # a preview: samples joined
    notes = fad.fad(fake_dir, real_dir, laion_dir, "clap_a", progress=False)["notes"]
    assert notes[0].startswith("1 of the 4 generated files look like training previews or sample grids")
    (tmp_path / "videos").mkdir()
    np.save(tmp_path / "videos" / "0.npy", np.zeros((8, 4, 4, 3), np.uint8))
    for fake, says in [(tmp_path / "nothere", "audio folder not found"), (tmp_path / "videos", "no audio files")]:
        with pytest.raises(FileNotFoundError, match=says):  # before CLAP loads (its path does not exist)
            fad.fad(fake, real_dir, tmp_path / "nothing", "clap_a")
    with pytest.raises(FileNotFoundError, match=r"CLAP_weights_2023\.pth.*microsoft/msclap"):
        clap.convert_checkpoint(tmp_path / "CLAP_weights_2023.pth", tmp_path / "o", "clap")
    (tmp_path / "notes.pt").write_text("good weights, honest")  # torch reads it as a pickle: "operand 103"
    with pytest.raises(ValueError, match=r"CLAP checkpoint .*notes\.pt is truncated or corrupt \(not a PyTorch"):
        clap.convert_checkpoint(tmp_path / "notes.pt", tmp_path / "o", "clap_a")
    with pytest.raises(ValueError, match="not a CLAP directory usable for CLAP"):
        clap.load_clap(laion_dir, "clap")  # MS-CLAP cannot come from a transformers ClapModel
