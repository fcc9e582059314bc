"""FAD with CLAP embeddings under the microsoft/fadtk protocol, and ``selfflow eval fad``.

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

import argparse
import os
import wave
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .clap import VARIANTS, ClapAudioEmbedder, ClapVariant, convert_checkpoint, load_clap
from .report import report_results

FADTK_RESAMPLE = {"lowpass_filter_width": 64, "rolloff": 0.9475937167399596,
                  "resampling_method": "sinc_interp_kaiser", "beta": 14.769656459379492}
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".opus")
PROTOCOL = ("fadtk {name}: mono, resample to {rate} Hz (torchaudio sinc_interp_kaiser as fadtk), "
            "16-bit PCM{int16}; {win} s windows every {hop} s over the whole file, zero-padded; "
            "one {dim}embedding per window{fp16}; mean + unbiased covariance over windows; "
            "Frechet distance")

AudioSource = str | os.PathLike | Sequence[Any]


# ----------------------------------------------------------------------------------------------
# audio input and the fadtk signal path


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


def pcm16(x: np.ndarray) -> np.ndarray:
    """A 16-bit PCM file round trip (fadtk's converted WAVs, read back as int16/32768)."""
    return np.clip(np.round(x * 32768.0), -32768, 32767) / 32768.0


def laion_int16(x: np.ndarray) -> np.ndarray:
    """LAION-CLAP's quantisation: ``clip(x,-1,1)·32767`` cast to int16 (toward zero), /32767."""
    return (np.clip(x, -1.0, 1.0) * 32767.0).astype(np.int16) / 32767.0


def prepare(audio: np.ndarray, rate: int, v: ClapVariant) -> np.ndarray:
    """Mono, resampled to ``v.sample_rate``, 16-bit PCM, LAION round trip if the variant uses it."""
    x = np.asarray(audio, dtype=np.float64)
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


# ----------------------------------------------------------------------------------------------
# embeddings, statistics, FAD


def embed_windows(source: AudioSource, embedder: ClapAudioEmbedder, *, batch_size: int = 16,
                  fp16: bool = True, progress: bool = True,
                  desc: str = "CLAP") -> tuple[np.ndarray, list[int]]:
    """All window embeddings of a set (float64 (N, D)) and the window count per file."""
    v = embedder.variant
    files, total = iter_audio(source)
    feats: list[np.ndarray] = []
    counts: list[int] = []
    pending: list[np.ndarray] = []

    def flush() -> None:
        batch = np.concatenate(pending)
        pending.clear()
        for i in range(0, len(batch), batch_size):
            feats.append(embedder(batch[i:i + batch_size]))

    with tqdm(total=total, desc=desc, unit="file", disable=not progress) as bar:
        for audio, rate in files:
            w = windows(prepare(audio, rate, v), v.sample_rate, v.window_s, v.hop_s)
            counts.append(len(w))
            pending.append(w)
            if sum(len(p) for p in pending) >= batch_size:
                flush()
            bar.update(1)
        if pending:
            flush()
    emb = np.concatenate(feats) if feats else np.empty((0, 0))
    if fp16:
        emb = emb.astype(np.float16).astype(np.float64)
    return emb, counts


def load_reference(path: str | os.PathLike, v: ClapVariant) -> Any:
    """Statistics from a ``.npz``: fadtk's ``<name>.mu/.cov`` keys, else ``FeatureStats.load``."""
    from .frechet import FeatureStats

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
    from .frechet import FeatureStats, frechet_distance

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
    return {v.key: float(frechet_distance(s_fake.mean, s_fake.cov, s_real.mean, s_real.cov)),
            "protocol": protocol, "weights": model.weights, "clap_variant": v.paper_name,
            "n_fake_windows": int(s_fake.count), "n_real_windows": int(s_real.count),
            "n_fake_files": len(counts_fake), "n_real_files": len(counts_real) or None}


# ----------------------------------------------------------------------------------------------
# CLI: selfflow eval fad


def _run(args: argparse.Namespace) -> int:
    if args.convert_from:
        if not (args.convert_to and args.variant):
            print("--convert-from needs --convert-to DIR and --variant")
            return 2
        out = convert_checkpoint(args.convert_from, args.convert_to, args.variant)
        print(f"wrote {out}")
        return 0
    models = {"clap": args.clap, "clap_m": args.clap_m, "clap_a": args.clap_a}
    if not (args.fake and args.real) or not any(models.values()):
        print("give --fake, --real and at least one of --clap / --clap-m / --clap-a")
        return 2
    results = {VARIANTS[k].key: fad(args.fake, args.real, path, k, batch_size=args.batch_size,
                                    fp16=not args.no_fp16, device=args.device)
               for k, path in models.items() if path}
    return report_results(results, args.out)


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``fad`` (FAD with CLAP / CLAP-M / CLAP-A, and checkpoint conversion)."""
    lines = "\n".join(f"  {k:7s} {v.paper_name:7s} = fadtk {v.fadtk_name}: {v.checkpoint} "
                      f"({v.arch}, {v.sample_rate} Hz, {v.window_s} s windows), {v.url}"
                      for k, v in VARIANTS.items())
    parser = subparsers.add_parser(
        "fad", help="audio metric: FAD with CLAP embeddings (fadtk protocol)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "FAD between --fake and --real with the fadtk protocol (mono, resample, 16-bit PCM, "
            "windows every 1 s over the whole file, zero-padded, one embedding per window).\n\n"
            "Inputs: folders of .wav (other formats need soundfile). --real may be a .npz of "
            "statistics (--save-real-stats, or fadtk's fma_pop.npz).\n\n"
            "Variants and weights (the paper-name mapping is inferred, see README_media.md):\n"
            f"{lines}\n\n"
            "Weights are local directories: a Hugging Face ClapModel directory for the LAION "
            "variants (laion/clap-htsat-unfused is 630k-audioset-best.pt), or a directory "
            "converted from the original file with\n"
            "  selfflow eval fad --convert-from FILE --convert-to DIR --variant clap_a|clap_m|clap"))
    parser.add_argument("--fake", help="folder of generated audio")
    parser.add_argument("--real", help="folder of reference audio or statistics .npz")
    parser.add_argument("--clap", help="MS-CLAP 2023 directory (converted)")
    parser.add_argument("--clap-m", help="LAION music CLAP directory")
    parser.add_argument("--clap-a", help="LAION audio CLAP directory")
    parser.add_argument("--no-fp16", action="store_true",
                        help="keep float32 embeddings (fadtk rounds them to float16)")
    parser.add_argument("--batch-size", type=int, default=16, help="windows per forward")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", help="also write the JSON results to this file")
    parser.add_argument("--convert-from", help="original checkpoint (.pt / .pth) to convert")
    parser.add_argument("--convert-to", help="output directory of the conversion")
    parser.add_argument("--variant", choices=sorted(VARIANTS), help="variant being converted")
    parser.set_defaults(func=_run)
    return parser
