"""Audio sources for the audio metrics: folders of audio files or lists of waveforms.

A clip is float64 ``(channels, T)`` in [-1, 1) with its sample rate. PCM WAV is read with the
standard library (16-bit as int/32768, like fadtk); other formats need ``soundfile``.
"""

from __future__ import annotations

import os
import wave
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".opus")

AudioSource = str | os.PathLike | Sequence[Any]


def read_audio(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """(float64 (channels, T) in [-1, 1), rate). PCM WAV via ``wave`` (16-bit read as int/32768
    like fadtk); anything else via ``soundfile`` if installed."""
    p = Path(path)
    if p.suffix.lower() == ".wav":
        try:
            with wave.open(str(p), "rb") as w:
                rate, ch, width = w.getframerate(), w.getnchannels(), w.getsampwidth()
                raw = w.readframes(w.getnframes())
        except wave.Error:
            pass  # e.g. IEEE-float WAV: fall through to soundfile
        else:
            if width == 3:  # 24-bit little endian → int32
                b = np.frombuffer(raw, np.uint8).reshape(-1, 3)
                ints = (b[:, 0].astype(np.int32) | b[:, 1].astype(np.int32) << 8
                        | b[:, 2].astype(np.int8).astype(np.int32) << 16)
                x = ints / float(1 << 23)
            elif width in (2, 4):
                x = np.frombuffer(raw, f"<i{width}") / float(1 << (8 * width - 1))
            elif width == 1:
                x = (np.frombuffer(raw, np.uint8).astype(np.float64) - 128) / 128
            else:
                raise ValueError(f"{p}: unsupported WAV sample width {width}")
            return x.reshape(-1, ch).T.astype(np.float64), rate
    try:
        import soundfile
    except ImportError as err:
        raise ImportError(f"reading {p} needs `pip install soundfile` (only PCM WAV is read "
                          "without it)") from err
    data, rate = soundfile.read(str(p), dtype="float64", always_2d=True)
    return data.T, int(rate)


def write_wav(path: str | os.PathLike, audio: np.ndarray, rate: int) -> None:
    """16-bit PCM WAV (mono (T,) or (channels, T) float in [-1, 1])."""
    x = np.atleast_2d(np.asarray(audio, dtype=np.float64))
    pcm = np.clip(np.round(x.T * 32768.0), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(x.shape[0])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())


def list_audio(folder: str | os.PathLike) -> list[Path]:
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"audio folder not found: {root}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no audio files ({', '.join(AUDIO_SUFFIXES)}) under {root}")
    return files


def iter_audio(source: AudioSource) -> tuple[Iterator[tuple[np.ndarray, int]], int]:
    """((waveform, rate) iterator, count) from a folder, or a list of paths / (waveform, rate)."""
    items = list_audio(source) if isinstance(source, (str, os.PathLike)) else list(source)
    return (read_audio(i) if isinstance(i, (str, os.PathLike)) else i for i in items), len(items)
