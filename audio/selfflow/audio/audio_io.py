"""Reading audio (soundfile, PyAV for what libsndfile cannot decode), resampling, writing WAV.

soundfile reads WAV/FLAC/MP3/OGG windows without decoding the whole file (the fast path for 10-s crops of
long tracks); PyAV (bundled FFmpeg) decodes everything else (AAC/M4A, audio inside videos). Resampling is
torchaudio's windowed-sinc ``functional.resample``. Everything returns float32 ``(channels, N)``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def _read_soundfile(path: Path, start_s: float, duration_s: float | None) -> tuple[np.ndarray, int]:
    import soundfile as sf

    with sf.SoundFile(str(path)) as f:
        sr = f.samplerate
        f.seek(min(int(start_s * sr), f.frames))
        n = -1 if duration_s is None else round(duration_s * sr)
        data = f.read(n, dtype="float32", always_2d=True)  # (N, C)
    return data.T, sr


def _read_pyav(path: Path, start_s: float, duration_s: float | None) -> tuple[np.ndarray, int]:
    import av

    chunks, sr = [], None
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        sr = stream.rate
        resampler = av.AudioResampler(format="fltp", rate=sr)  # planar float, native layout
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray())
    if not chunks:
        raise ValueError(f"{path}: no decodable audio")
    data = np.concatenate(chunks, axis=1)
    start = int(start_s * sr)
    end = None if duration_s is None else start + round(duration_s * sr)
    return data[:, start:end], sr


def read_audio(path: str | Path, sample_rate: int, channels: int = 2, start_s: float = 0.0,
               duration_s: float | None = None) -> torch.Tensor:
    """``(channels, N)`` float32 at ``sample_rate``: mono is repeated, extra channels dropped (stereo) or
    averaged (mono)."""
    path = Path(path)
    try:
        data, sr = _read_soundfile(path, start_s, duration_s)
    except Exception:  # libsndfile cannot decode it (AAC, video containers …): FFmpeg can
        data, sr = _read_pyav(path, start_s, duration_s)
    x = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
    if channels == 1:
        x = x.mean(0, keepdim=True)
    elif x.shape[0] == 1:
        x = x.repeat(channels, 1)
    elif x.shape[0] < channels:
        raise ValueError(f"{path}: {x.shape[0]} channels, cannot make {channels}")
    x = x[:channels]
    if sr != sample_rate:
        import torchaudio.functional as AF

        x = AF.resample(x, sr, sample_rate)
    return x


def audio_duration(path: str | Path) -> float:
    """Length in seconds (soundfile header, else a PyAV decode)."""
    try:
        import soundfile as sf

        info = sf.info(str(path))
        return info.frames / info.samplerate
    except Exception:
        data, sr = _read_pyav(Path(path), 0.0, None)
        return data.shape[1] / sr


def fit_length(x: torch.Tensor, n: int) -> torch.Tensor:
    """Crop or zero-pad ``(C, N)`` to ``n`` samples."""
    return x[:, :n] if x.shape[1] >= n else torch.nn.functional.pad(x, (0, n - x.shape[1]))


def write_wav(wave: torch.Tensor, path: str | Path, sample_rate: int) -> Path:
    """``(C, N)`` in [-1, 1] → 16-bit PCM WAV, written atomically."""
    import soundfile as sf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.wav")
    sf.write(str(tmp), wave.detach().float().clamp(-1, 1).cpu().numpy().T, sample_rate, subtype="PCM_16")
    tmp.replace(path)
    return path
