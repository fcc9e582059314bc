"""Audio reading: PCM WAV through the standard library, folders, (waveform, rate) lists."""

from __future__ import annotations

import numpy as np
import pytest

from selfflow.eval.audio_io import iter_audio, list_audio, read_audio, write_wav


def _tones(rate: int, seconds: float = 0.2) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return np.stack([0.5 * np.sin(2 * np.pi * 300 * t), 0.3 * np.sin(2 * np.pi * 500 * t + 1.0)])


def test_wav_round_trip_is_16_bit_pcm(tmp_path) -> None:
    x = _tones(16_000)  # (2, T)
    write_wav(tmp_path / "a.wav", x, 16_000)
    back, rate = read_audio(tmp_path / "a.wav")
    assert rate == 16_000 and back.shape == x.shape
    np.testing.assert_array_equal(back, np.clip(np.round(x * 32768), -32768, 32767) / 32768)


def test_folder_and_list_sources(tmp_path) -> None:
    (tmp_path / "sub").mkdir()
    write_wav(tmp_path / "sub" / "b.wav", _tones(8_000)[0], 8_000)
    write_wav(tmp_path / "a.wav", _tones(8_000)[1], 8_000)
    (tmp_path / "notes.txt").write_text("not audio")
    assert [p.name for p in list_audio(tmp_path)] == ["a.wav", "b.wav"]
    clips, n = iter_audio(tmp_path)
    assert n == 2 and all(rate == 8_000 and x.shape == (1, 1600) for x, rate in clips)
    pair = (np.zeros((1, 5)), 44_100)
    clips, n = iter_audio([pair, tmp_path / "a.wav"])
    assert n == 2 and next(clips) is pair
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no audio files"):
        list_audio(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="audio folder not found"):
        list_audio(tmp_path / "missing")
