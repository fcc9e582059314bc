"""FAD with CLAP embeddings under the microsoft/fadtk protocol.

Per file: mix down to mono (channel mean); resample to the embedding's rate with fadtk's
torchaudio settings (sinc/Kaiser, width 64, rolloff 0.9475937…, beta 14.769656…) and store as
16-bit PCM (fadtk writes ``convert/<rate>/*.wav`` and reads them back as int16/32768); for the
LAION models, the extra ``clip(-1,1)·32767 → int16 → /32767`` round trip; then windows of
``window_s`` seconds starting every second over the whole file (``range(0, T, rate)``), each
zero-padded to full length — a 10 s clip gives 10 windows, 9 of them partly padding — and one
embedding per window. Statistics: mean and unbiased covariance over all windows of all files;
embeddings are rounded to float16 first because fadtk caches them that way (``fp16=False`` turns
this off). Distance: Fréchet.

Inputs: folders of ``.wav`` (PCM through the standard library; other formats if ``soundfile`` is
installed), or lists of ``(waveform, sample_rate)`` pairs; ``real`` may also be a ``.npz`` of
statistics (ours, or fadtk's reference files such as ``fma_pop.npz`` with ``<fadtk name>.mu/.cov``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .audio_io import AudioSource, iter_audio, list_audio
from .clap import ClapAudioEmbedder, ClapVariant, load_clap
from .extractor import extract
from .frechet import FeatureStats, checked_distance
from .preview_files import listed_sets

FADTK_RESAMPLE = {"lowpass_filter_width": 64, "rolloff": 0.9475937167399596,
                  "resampling_method": "sinc_interp_kaiser", "beta": 14.769656459379492}
PROTOCOL = ("fadtk {name}: mono, resample to {rate} Hz (torchaudio sinc_interp_kaiser as fadtk), "
            "16-bit PCM{int16}; {win} s windows every {hop} s over the whole file, zero-padded; "
            "one {dim}embedding per window{fp16}; mean + unbiased covariance over windows; "
            "Frechet distance")


# ----------------------------------------------------------------------------------------------
# the fadtk signal path


def pcm16(x: np.ndarray) -> np.ndarray:
    """A 16-bit PCM file round trip (fadtk's converted WAVs, read back as int16/32768)."""
    return np.clip(np.round(x * 32768.0), -32768, 32767) / 32768.0


def laion_int16(x: np.ndarray) -> np.ndarray:
    """LAION-CLAP's quantisation: ``clip(x,-1,1)·32767`` cast to int16 (toward zero), /32767."""
    return (np.clip(x, -1.0, 1.0) * 32767.0).astype(np.int16) / 32767.0


def prepare(audio: np.ndarray, rate: int, v: ClapVariant) -> np.ndarray:
    """Mono, resampled to ``v.sample_rate``, 16-bit PCM, LAION round trip if the variant uses it."""
    x = np.asarray(audio, dtype=np.float64)
    if x.ndim == 2 and x.shape[0] > x.shape[1]:  # soundfile's (T, channels): averaging it would keep 2 samples
        raise ValueError(f"audio must be (T,) or (channels, T), got {x.shape}: (T, channels)? transpose it")
    if x.ndim == 2:
        x = x.mean(axis=0)
    if x.ndim != 1:
        raise ValueError(f"audio must be (T,) or (channels, T), got {x.shape}")
    if rate != v.sample_rate:
        import torchaudio.functional as AF

        x = AF.resample(torch.from_numpy(x), rate, v.sample_rate, **FADTK_RESAMPLE).numpy()
    x = pcm16(x)
    return laion_int16(x) if v.int16_roundtrip else x


def windows(x: np.ndarray, rate: int, window_s: float, hop_s: float = 1.0) -> np.ndarray:
    """fadtk windowing: starts ``0, hop, 2·hop, … < T`` (so ``ceil(T / hop)`` windows), each
    ``window_s`` long, zero-padded at the tail. (n, window) float32."""
    win, hop = round(window_s * rate), round(hop_s * rate)
    starts = range(0, len(x), hop)
    out = np.zeros((len(starts), win), dtype=np.float32)
    for i, s in enumerate(starts):
        chunk = x[s:s + win]
        out[i, :len(chunk)] = chunk
    return out


# ----------------------------------------------------------------------------------------------
# embeddings, statistics, FAD


def embed_windows(source: AudioSource, embedder: ClapAudioEmbedder, *, batch_size: int = 16,
                  fp16: bool = True, progress: bool = True,
                  desc: str = "CLAP") -> tuple[np.ndarray, list[int]]:
    """All window embeddings of a set (float64 (N, D)) and the window count per file."""
    v = embedder.variant
    files, _ = iter_audio(source)
    counts: list[int] = []

    def all_windows() -> Iterator[np.ndarray]:
        for audio, rate in files:
            w = windows(prepare(audio, rate, v), v.sample_rate, v.window_s, v.hop_s)
            counts.append(len(w))
            yield from w

    emb = extract(embedder, all_windows(), batch_size=batch_size, desc=desc, unit="window",
                  progress=progress)
    if fp16:
        emb = emb.astype(np.float16).astype(np.float64)
    return emb, counts


def load_reference(path: str | os.PathLike, v: ClapVariant) -> Any:
    """Statistics from a ``.npz``: fadtk's ``<name>.mu/.cov`` keys, else ``FeatureStats.load``."""
    with np.load(path) as z:
        if f"{v.fadtk_name}.mu" in z.files:
            return FeatureStats.from_moments(z[f"{v.fadtk_name}.mu"], z[f"{v.fadtk_name}.cov"])
    return FeatureStats.load(path)


def fad(fake: AudioSource, real: AudioSource, model: ClapAudioEmbedder | str | os.PathLike,
        variant: str | None = None, *, batch_size: int = 16, fp16: bool = True,
        device: str = "cpu", progress: bool = True,
        save_real_stats: str | os.PathLike | None = None) -> dict[str, Any]:
    """FAD between generated and reference audio with one CLAP variant (``clap``, ``clap_m``,
    ``clap_a``; taken from ``model`` when it is a loaded embedder)."""
    preview_notes = listed_sets(fake, real, list_audio, lambda source: Path(source).suffix == ".npz")
    if not isinstance(model, ClapAudioEmbedder):
        if variant is None:
            raise ValueError("pass variant= (clap, clap_m or clap_a) with a model directory")
        model = load_clap(model, variant)
    model = model.to(device)
    v = model.variant
    kw = {"batch_size": batch_size, "fp16": fp16, "progress": progress}
    counts_real: list[int] = []
    if isinstance(real, (str, os.PathLike)) and Path(real).suffix == ".npz":
        s_real = load_reference(real, v)
    else:
        emb, counts_real = embed_windows(real, model, desc=f"{v.paper_name} real", **kw)
        s_real = FeatureStats().update(emb)
    if save_real_stats is not None:
        s_real.save(save_real_stats)
    emb, counts_fake = embed_windows(fake, model, desc=f"{v.paper_name} fake", **kw)
    s_fake = FeatureStats().update(emb)
    protocol = PROTOCOL.format(name=v.fadtk_name, rate=v.sample_rate, win=v.window_s, hop=v.hop_s,
                               int16=" + LAION int16 round trip" if v.int16_roundtrip else "",
                               dim="L2-normalised " if v.normalize else "",
                               fp16=", rounded to float16" if fp16 else "")
    value, notes = checked_distance(f"FAD {v.paper_name}", s_fake, s_real)
    return {v.key: float(value),
            "protocol": protocol, "weights": model.weights, "clap_variant": v.paper_name,
            "n_fake_windows": int(s_fake.count), "n_real_windows": int(s_real.count),
            "n_fake_files": len(counts_fake), "n_real_files": len(counts_real) or None,
            "notes": preview_notes + notes}
