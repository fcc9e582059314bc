"""FVD (StyleGAN-V protocol ``fvd2048_16f``) and framewise FID, plus ``selfflow eval fvd``.

FVD: clips of 16 consecutive frames (``--clip-start``, ``--stride`` = StyleGAN-V's
``subsample_factor``; videos shorter than a clip are skipped and counted, as StyleGAN-V's
``discard_short_videos``), at most 2048 clips per set, fed as uint8 ``[B, 3, T, H, W]`` to the
TorchScript I3D with ``rescale=True, resize=True, return_features=True`` (400-d), statistics with
the **biased** covariance (÷N, StyleGAN-V ``FeatureStats``), Fréchet distance.
StyleGAN-V's dataset may start clips at a random offset; we use a fixed, reported start (0 by
default) so results are deterministic.

Framewise FID: every frame is an image for the FID Inception (``selfflow.eval.inception``, TF1
resize to 299), at most 50 000 frames per set (``fid50k``), biased covariance as in StyleGAN-V.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageSequence
from tqdm.auto import tqdm

from .i3d import I3D_KWARGS, WEIGHTS_HELP, I3DFeatures, load_i3d
from .report import report_results

NUM_FRAMES = 16
MAX_CLIPS = 2048
MAX_FRAMES_FID = 50_000
PROTOCOL_FVD = ("StyleGAN-V fvd2048_16f: i3d_torchscript.pt called on uint8 [B,3,T,H,W] with "
                "rescale=True, resize=True, return_features=True (400-d); {frames} consecutive "
                "frames from frame {start} with stride {stride}; up to {max_clips} clips per set; "
                "biased covariance; Frechet distance")
PROTOCOL_FID = ("framewise FID (StyleGAN-V fid50k on frames): FID Inception pool3 (TF1 bilinear "
                "to 299), frames as images, up to {max_frames} frames per set; biased covariance")
VIDEO_SUFFIXES = (".mp4", ".webm", ".avi", ".mov", ".mkv")
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

VideoSource = str | os.PathLike | np.ndarray | torch.Tensor | Sequence[Any]


# ----------------------------------------------------------------------------------------------
# video input


def _read_container(path: Path) -> np.ndarray:
    try:
        import av
    except ImportError as err:
        raise ImportError(f"reading {path.suffix} videos needs PyAV (`pip install av`); or convert "
                          f"them to .npy (T, H, W, 3) uint8 arrays or folders of frames") from err
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if not frames:
        raise ValueError(f"{path}: no video frames")
    return np.stack(frames)


def read_video(path: str | os.PathLike) -> np.ndarray:
    """One video as uint8 (T, H, W, 3): ``.npy`` / ``.npz`` (first array), ``.gif``, a folder of
    frame images (sorted by name), or ``.mp4``/``.webm``/... through PyAV."""
    p = Path(path)
    if p.is_dir():
        frames = sorted(f for f in p.iterdir() if f.suffix.lower() in FRAME_SUFFIXES)
        if not frames:
            raise ValueError(f"{p}: a video folder must contain frame images")
        arr = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in frames])
    elif p.suffix == ".npy":
        arr = np.load(p)
    elif p.suffix == ".npz":
        with np.load(p) as z:
            arr = z[z.files[0]]
    elif p.suffix.lower() == ".gif":
        with Image.open(p) as img:
            arr = np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(img)])
    elif p.suffix.lower() in VIDEO_SUFFIXES:
        arr = _read_container(p)
    else:
        raise ValueError(f"unsupported video file {p}")
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"{p}: expected uint8 (T, H, W, 3), got {arr.dtype} {arr.shape}")
    return arr


def list_videos(folder: str | os.PathLike) -> list[Path]:
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"video folder not found: {root}")
    items = sorted(p for p in root.iterdir()
                   if p.is_dir() or p.suffix.lower() in (".npy", ".npz", ".gif", *VIDEO_SUFFIXES))
    if not items:
        raise FileNotFoundError(f"no videos (.npy/.npz/.gif/.mp4/... or frame folders) in {root}")
    return items


def iter_videos(source: VideoSource) -> tuple[Iterator[np.ndarray], int]:
    """(iterator of uint8 (T, H, W, 3) videos, count) from a folder, an (N, T, H, W, 3) array,
    or a list of arrays / paths."""
    if isinstance(source, (str, os.PathLike)):
        files = list_videos(source)
        return (read_video(f) for f in files), len(files)
    if isinstance(source, torch.Tensor):
        source = source.detach().cpu().numpy()
    if isinstance(source, np.ndarray) and source.ndim != 5:
        raise ValueError(f"expected videos (N, T, H, W, 3), got shape {source.shape}")
    return (read_video(v) if isinstance(v, (str, os.PathLike)) else np.asarray(v)
            for v in source), len(source)


@dataclass
class ClipReport:
    used: int = 0
    skipped_short: int = 0
    lengths: list[int] = field(default_factory=list)


def iter_clips(source: VideoSource, num_frames: int = NUM_FRAMES, start: int = 0, stride: int = 1,
               max_clips: int = MAX_CLIPS, report: ClipReport | None = None) -> Iterator[np.ndarray]:
    """One clip per video: frames ``start, start+stride, …`` (``num_frames`` of them). Videos too
    short are skipped and counted in ``report``."""
    report = report if report is not None else ClipReport()
    videos, _ = iter_videos(source)
    need = start + (num_frames - 1) * stride + 1
    for video in videos:
        if report.used >= max_clips:
            break
        if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
            raise ValueError(f"videos must be uint8 (T, H, W, 3), got {video.dtype} {video.shape}")
        if video.shape[0] < need:
            report.skipped_short += 1
            continue
        report.used += 1
        report.lengths.append(int(video.shape[0]))
        yield np.ascontiguousarray(video[start:need:stride])


def iter_frames(source: VideoSource, max_frames: int = MAX_FRAMES_FID) -> Iterator[np.ndarray]:
    """All frames of all videos, in order, as uint8 (H, W, 3) images, at most ``max_frames``."""
    videos, _ = iter_videos(source)
    n = 0
    for video in videos:
        for frame in video:
            if n >= max_frames:
                return
            n += 1
            yield frame


# ----------------------------------------------------------------------------------------------
# metrics


def _is_stats(source: Any) -> bool:
    return isinstance(source, (str, os.PathLike)) and Path(source).suffix == ".npz"


def i3d_stats(source: VideoSource, extractor: I3DFeatures, *, num_frames: int = NUM_FRAMES,
              start: int = 0, stride: int = 1, max_clips: int = MAX_CLIPS,
              desc: str = "I3D") -> tuple[Any, ClipReport]:
    """Biased ``FeatureStats`` of the I3D features of one clip per video."""
    from .frechet import FeatureStats

    report = ClipReport()
    clips = iter_clips(source, num_frames, start, stride, max_clips, report)
    feats = extractor(clips, total=min(max_clips, iter_videos(source)[1]), desc=desc)
    if report.skipped_short:
        print(f"FVD: skipped {report.skipped_short} videos shorter than {num_frames} frames "
              f"(stride {stride}, start {start})")
    return FeatureStats(biased=True).update(feats), report


def fvd(fake: VideoSource, real: VideoSource, detector: Any | str | os.PathLike, *,
        num_frames: int = NUM_FRAMES, start: int = 0, stride: int = 1, max_clips: int = MAX_CLIPS,
        batch_size: int = 8, device: str = "cpu", progress: bool = True,
        save_real_stats: str | os.PathLike | None = None) -> dict[str, Any]:
    """FVD between generated and real videos (StyleGAN-V protocol). ``real`` may also be a
    ``.npz`` of statistics written by ``save_real_stats``. ``detector``: the path of
    ``i3d_torchscript.pt`` or a loaded module with the same call signature."""
    from .frechet import FeatureStats, frechet_distance

    weights = str(detector) if isinstance(detector, (str, os.PathLike)) else "in-memory module"
    if isinstance(detector, (str, os.PathLike)):
        detector = load_i3d(detector, device)
    extractor = I3DFeatures(detector, batch_size=batch_size, device=device, progress=progress)
    kw = {"num_frames": num_frames, "start": start, "stride": stride, "max_clips": max_clips}
    if _is_stats(real):
        s_real = FeatureStats.load(real)
    else:
        s_real, _ = i3d_stats(real, extractor, desc="I3D real", **kw)
    if save_real_stats is not None:
        s_real.save(save_real_stats)
    s_fake, _ = i3d_stats(fake, extractor, desc="I3D fake", **kw)
    value = frechet_distance(s_fake.mean, s_fake.cov, s_real.mean, s_real.cov)
    protocol = PROTOCOL_FVD.format(frames=num_frames, start=start, stride=stride,
                                   max_clips=max_clips)
    return {"fvd": float(value), "protocol": protocol, "weights": weights,
            "detector_kwargs": dict(I3D_KWARGS), "n_fake": int(s_fake.count),
            "n_real": int(s_real.count)}


def frame_stats(source: VideoSource, inception: Any, *, max_frames: int = MAX_FRAMES_FID,
                batch_size: int = 50, device: str = "cpu", progress: bool = True,
                desc: str = "Inception frames") -> Any:
    """Biased ``FeatureStats`` of FID-Inception pool features of the frames of a video set."""
    from .frechet import FeatureStats

    stats = FeatureStats(biased=True)
    batch: list[np.ndarray] = []

    def flush() -> None:
        x = torch.from_numpy(np.stack(batch)).to(device)  # (B, H, W, 3) uint8
        with torch.no_grad():
            stats.update(inception(x, spatial=False, logits=False).pool.double().cpu())
        bar.update(len(batch))
        batch.clear()

    with tqdm(desc=desc, unit="frame", disable=not progress) as bar:
        for frame in iter_frames(source, max_frames):
            if batch and frame.shape != batch[0].shape:
                flush()
            batch.append(frame)
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
    return stats


def fid_frames(fake: VideoSource, real: VideoSource,
               inception: Any | str | os.PathLike | None = None, *,
               max_frames: int = MAX_FRAMES_FID, batch_size: int = 50, device: str = "cpu",
               progress: bool = True) -> dict[str, Any]:
    """Framewise FID: flatten both video sets into frames and compare FID-Inception statistics.
    ``inception``: a loaded ``FIDInceptionV3``, the path of its weights, or None for the
    default lookup of ``selfflow.eval.inception``."""
    from .frechet import FeatureStats, frechet_distance
    from .inception import load_inception

    if inception is None or isinstance(inception, (str, os.PathLike)):
        inception = load_inception(inception, device=device)
    weights = str(getattr(inception, "weights_path", "in-memory model"))
    kw = {"max_frames": max_frames, "batch_size": batch_size, "device": device,
          "progress": progress}
    s_real = FeatureStats.load(real) if _is_stats(real) else frame_stats(
        real, inception, desc="Inception real frames", **kw)
    s_fake = frame_stats(fake, inception, desc="Inception fake frames", **kw)
    value = frechet_distance(s_fake.mean, s_fake.cov, s_real.mean, s_real.cov)
    return {"fid_frames": float(value), "protocol": PROTOCOL_FID.format(max_frames=max_frames),
            "weights": weights, "n_fake": int(s_fake.count), "n_real": int(s_real.count)}


# ----------------------------------------------------------------------------------------------
# CLI: selfflow eval fvd


def _run(args: argparse.Namespace) -> int:
    if args.frames_fid and not args.real_frames and _is_stats(args.real):
        print("--real is a statistics file of I3D features: give --real-frames (videos or "
              "Inception statistics) for framewise FID")
        return 2
    results: dict[str, Any] = {}
    if args.i3d:
        results["fvd"] = fvd(args.fake, args.real, args.i3d, num_frames=args.frames,
                             start=args.clip_start, stride=args.stride, max_clips=args.max_clips,
                             batch_size=args.batch_size, device=args.device,
                             save_real_stats=args.save_real_stats)
    if args.frames_fid:
        results["fid_frames"] = fid_frames(args.fake, args.real_frames or args.real,
                                           args.inception, max_frames=args.max_frames,
                                           device=args.device)
    if not results:
        print("nothing to compute: give --i3d and/or --frames-fid")
        return 2
    return report_results(results, args.out)


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``fvd`` (FVD and framewise FID) to an argparse subparsers object."""
    parser = subparsers.add_parser(
        "fvd", help="video metrics: FVD (StyleGAN-V) and framewise FID",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "FVD with the StyleGAN-V protocol (fvd2048_16f) and, with --frames-fid, framewise "
            "FID, between --fake and --real.\n\n"
            "Inputs: folders of videos, one per entry: .npy/.npz uint8 (T, H, W, 3) arrays, "
            ".gif, folders of frame images, or .mp4/.webm/... (needs PyAV). One 16-frame clip "
            "per video (--clip-start, --stride); shorter videos are skipped and counted. --real "
            "may be a .npz of I3D statistics written earlier with --save-real-stats.\n\n"
            "Weights (local files, nothing is downloaded):\n"
            f"  --i3d: {WEIGHTS_HELP}\n"
            "  --inception: the FID Inception weights of selfflow.eval.inception "
            "(pt_inception-2015-12-05-6726825d.pth)"))
    parser.add_argument("--fake", required=True, help="folder of generated videos")
    parser.add_argument("--real", required=True, help="folder of real videos or I3D stats .npz")
    parser.add_argument("--i3d", help="path of i3d_torchscript.pt (enables FVD)")
    parser.add_argument("--frames", type=int, default=NUM_FRAMES, help="frames per clip (16)")
    parser.add_argument("--clip-start", type=int, default=0, help="first frame of each clip")
    parser.add_argument("--stride", type=int, default=1, help="frame subsampling factor")
    parser.add_argument("--max-clips", type=int, default=MAX_CLIPS, help="clips per set (2048)")
    parser.add_argument("--save-real-stats", help="write the real I3D statistics to this .npz")
    parser.add_argument("--frames-fid", action="store_true", help="also compute framewise FID")
    parser.add_argument("--real-frames", help="real videos or Inception stats .npz for framewise "
                                              "FID (default: --real)")
    parser.add_argument("--inception", help="FID Inception weights file")
    parser.add_argument("--max-frames", type=int, default=MAX_FRAMES_FID)
    parser.add_argument("--batch-size", type=int, default=8, help="clips per I3D batch")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", help="also write the JSON results to this file")
    parser.set_defaults(func=_run)
    return parser
