import numpy as np
import pytest
import soundfile as sf
import torch

from selfflow.audio import audio_io
from selfflow.audio.audio_io import fit_length, read_audio, write_wav
from selfflow.audio.oobleck_codec import OobleckCodec
from selfflow.audio.synthetic_tones import CAPTIONS, CHORDS, CLASSES, render_batch, render_tone
from selfflow.audio.waveform_codec import WaveformCodec

from .conftest import tiny_oobleck


def test_synthetic_tones_are_deterministic_and_sound_like_their_caption():
    a, _ = render_tone(0, 3)
    assert np.array_equal(a, render_tone(0, 3)[0]) and not np.array_equal(a, render_tone(1, 3)[0])
    assert a.shape == (2, 4096) and np.abs(a).max() <= 1
    waves, labels, captions = render_batch(0, range(48))
    assert set(labels.tolist()) == set(range(len(CLASSES)))
    for w, k, cap in zip(waves.numpy(), labels.tolist(), captions):
        chord, instrument = CLASSES[k]
        assert cap == CAPTIONS[k] == f"a {chord} chord on a {instrument}"
        spec = np.abs(np.fft.rfft(w.mean(0)))
        peak = np.argmax(spec) * 8000 / 4096
        assert min(abs(peak - f) for f in CHORDS[chord]) < 12, (cap, peak)  # loudest partial: a chord note
        energy = (w**2).sum(0)
        decays = energy[-1024:].sum() < 0.2 * energy[:1024].sum()
        assert decays == (instrument == "pluck"), cap


def test_waveform_codec_round_trip_and_ids():
    codec = WaveformCodec(4096, 64)
    wave = torch.rand(2, 2, 4096) * 2 - 1
    tokens = codec.to_tokens(wave)
    assert tokens.x.shape == (2, 64, 128) and codec.token_channels == 128
    assert tokens.ids[0, 5].tolist() == [5, 0, 0]
    assert torch.equal(tokens.x[0, 1, :64], wave[0, 0, 64:128])  # channel-major inside a token
    assert torch.equal(codec.from_tokens(tokens.x), wave)


def test_oobleck_codec_shapes_normalisation_and_missing_dir(tmp_path, oobleck_dir):
    vae = tiny_oobleck()
    codec = OobleckCodec(vae, mean=[0.5, -1.0, 0.0, 2.0], std=[2.0, 1.0, 0.5, 4.0])
    wave = torch.rand(1, 2, 800) * 2 - 1
    raw, z = codec.encode_raw(wave), codec.encode(wave)
    assert raw.shape == z.shape == (1, 4, 100) and codec.hop == 8 and codec.sample_rate == 8000
    assert torch.allclose(z, (raw - codec.mean) / codec.std) and torch.allclose(codec.denormalize(z), raw, atol=1e-6)
    assert torch.allclose(raw, vae.encode(wave).latent_dist.mean)
    out = codec.decode(z)
    assert out.shape == wave.shape and torch.allclose(out, vae.decode(raw).sample.clamp(-1, 1), atol=1e-5)
    with pytest.raises(ValueError, match="multiple of the VAE hop"):
        codec.encode(torch.zeros(1, 2, 801))
    loaded = OobleckCodec.from_pretrained(oobleck_dir)
    assert loaded.latent_channels == 4
    with pytest.raises(FileNotFoundError, match=r"(?s)nope.*CypressYang/SongBloom"):
        OobleckCodec.from_pretrained(tmp_path / "nope", "songbloom")
    with pytest.raises(FileNotFoundError, match=r"stable-audio-open-1\.0"):
        OobleckCodec.from_pretrained(tmp_path / "nope", "stable_audio")
    # another class's folder (a Wan VAE): diffusers loaded it with random weights, and prepare wrote noise
    wan = tmp_path / "wan"
    wan.mkdir()
    (wan / "config.json").write_text('{"_class_name": "AutoencoderKLWan", "z_dim": 48}')
    with pytest.raises(ValueError, match=r"wan holds a AutoencoderKLWan \(its config\.json's _class_name\), not the "
                                         r"AutoencoderOobleck this codec loads"):
        OobleckCodec.from_pretrained(wan)


def test_read_resample_mono_and_pyav_fallback(tmp_path, monkeypatch):
    t = np.arange(16000) / 16000
    mono = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    sf.write(tmp_path / "a.wav", mono, 16000, subtype="FLOAT")
    x = read_audio(tmp_path / "a.wav", 8000, channels=2, start_s=0.25, duration_s=0.5)
    assert x.shape == (2, 4000) and torch.equal(x[0], x[1])
    peak = np.argmax(np.abs(np.fft.rfft(x[0].numpy()))) * 8000 / 4000
    assert abs(peak - 440) < 3
    def no_soundfile(*a, **k):
        raise RuntimeError("libsndfile cannot read this")
    monkeypatch.setattr(audio_io, "_read_soundfile", no_soundfile)
    y = read_audio(tmp_path / "a.wav", 8000, channels=2, start_s=0.25, duration_s=0.5)
    assert y.shape == x.shape and torch.allclose(x, y, atol=1e-5)
    assert fit_length(torch.ones(2, 3), 5).tolist() == [[1, 1, 1, 0, 0]] * 2
    path = write_wav(torch.tensor([[0.5, -0.5], [0.25, 1.5]]), tmp_path / "b.wav", 8000)
    data, sr = sf.read(path)
    assert sr == 8000 and data.shape == (2, 2) and np.allclose(data.T, [[0.5, -0.5], [0.25, 1.0]], atol=1e-4)
