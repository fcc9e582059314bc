"""FVD (StyleGAN-V protocol ``fvd2048_16f``) and framewise FID.

FVD: clips of 16 consecutive frames (``--clip-start``, ``--stride`` = StyleGAN-V's
``subsample_factor``; videos with fewer than ``16·stride`` frames after the start are skipped and
counted, as StyleGAN-V's ``discard_short_videos``), at most 2048 clips per set, fed as uint8
``[B, 3, T, H, W]`` to the TorchScript I3D with ``rescale=True, resize=True, return_features=True`` (400-d), statistics with
the **biased** covariance (÷N, StyleGAN-V ``FeatureStats``), Fréchet distance.
StyleGAN-V's dataset may start clips at a random offset; we use a fixed, reported start (0 by
default) so results are deterministic.

Framewise FID: every frame is an image for the FID Inception (``selfflow.eval.inception``, TF1
resize to 299), at most 50 000 frames per set (``fid50k``), biased covariance as in StyleGAN-V.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .extractor import extract_stats
from .frechet import FeatureStats, checked_distance, save_npz_atomic
from .i3d import I3D_KWARGS, I3DFeatures, load_i3d
from .preview_files import listed_sets
from .reference_source import check_source, source_record
from .video_io import (
    ClipReport,
    VideoSource,
    is_stats_file,
    iter_clips,
    iter_frames,
    iter_videos,
    list_videos,
)

NUM_FRAMES = 16
MAX_CLIPS = 2048
MAX_FRAMES_FID = 50_000
PROTOCOL_FVD = ("StyleGAN-V fvd{max_clips}_{frames}f: i3d_torchscript.pt called on uint8 [B,3,T,H,W] with "
                "rescale=True, resize=True, return_features=True (400-d); {frames} consecutive "
                "frames from frame {start} with stride {stride}; up to {max_clips} clips per set; "
                "biased covariance; Frechet distance")
PROTOCOL_FID = ("framewise FID (StyleGAN-V fid50k on frames): FID Inception pool3 (TF1 bilinear "
                "to 299), frames as images, up to {max_frames} frames per set; biased covariance")


def i3d_stats(source: VideoSource, extractor: I3DFeatures, *, num_frames: int = NUM_FRAMES,
              start: int = 0, stride: int = 1, max_clips: int = MAX_CLIPS,
              desc: str = "I3D") -> tuple[FeatureStats, ClipReport]:
    """Biased ``FeatureStats`` of the I3D features of one clip per video."""
    report = ClipReport()
    need = start + num_frames * stride

    def clips() -> Iterator[np.ndarray]:
        yield from iter_clips(source, num_frames, max_clips, start=start, stride=stride, report=report)
        if report.skipped_short and not report.used:  # else the extractor's "nothing to embed" would not say why
            raise ValueError(f"{desc}: all {report.skipped_short} videos are shorter than the {need} frames a clip "
                             f"takes ({num_frames} frames × stride {stride} after start {start}; the longest has "
                             f"{report.longest_skipped}): pass --frames (and --stride, --clip-start) that fit them "
                             f"— the StyleGAN-V protocol takes {NUM_FRAMES}")

    feats = extractor(clips(), total=min(max_clips, iter_videos(source)[1]), desc=desc)
    if report.skipped_short:
        print(f"FVD: skipped {report.skipped_short} videos shorter than {need} "
              f"frames ({num_frames} frames × stride {stride} after start {start})")
    return FeatureStats(biased=True).update(feats), report


def fvd(fake: VideoSource, real: VideoSource, detector: Any | str | os.PathLike, *,
        num_frames: int = NUM_FRAMES, start: int = 0, stride: int = 1, max_clips: int = MAX_CLIPS,
        batch_size: int = 8, device: str = "cpu", progress: bool = True,
        save_real_stats: str | os.PathLike | None = None) -> dict[str, Any]:
    """FVD between generated and real videos (StyleGAN-V protocol). ``real`` may also be a
    ``.npz`` of statistics written by ``save_real_stats``. ``detector``: the path of
    ``i3d_torchscript.pt`` or a loaded module with the same call signature."""
    preview_notes = listed_sets(fake, real, list_videos, is_stats_file)
    weights = str(detector) if isinstance(detector, (str, os.PathLike)) else "in-memory module"
    weights_path = detector if isinstance(detector, (str, os.PathLike)) else None
    if is_stats_file(real):  # before the network loads: another network's or other weights' reference
        check_source(real, "i3d", weights_path)
    if isinstance(detector, (str, os.PathLike)):
        detector = load_i3d(detector, device)
    extractor = I3DFeatures(detector, batch_size=batch_size, device=device, progress=progress)
    kw = {"num_frames": num_frames, "start": start, "stride": stride, "max_clips": max_clips}
    protocol = PROTOCOL_FVD.format(frames=num_frames, start=start, stride=stride,
                                   max_clips=max_clips)
    stats_notes = []
    if is_stats_file(real):
        s_real = FeatureStats.load(real)
        stats_notes = check_stats_protocol(real, protocol)
    else:
        s_real, _ = i3d_stats(real, extractor, desc="I3D real", **kw)
    if save_real_stats is not None:  # with the protocol it was made under, checked when it is read back
        save_npz_atomic(save_real_stats, {**s_real.npz_dict(), "protocol": np.asarray(protocol),
                                           **source_record("i3d", weights_path)})
    s_fake, _ = i3d_stats(fake, extractor, desc="I3D fake", **kw)
    value, notes = checked_distance("FVD", s_fake, s_real)
    notes = preview_notes + stats_notes + notes
    return {"fvd": float(value), "protocol": protocol, "weights": weights,
            "detector_kwargs": dict(I3D_KWARGS), "n_fake": int(s_fake.count),
            "n_real": int(s_real.count), "notes": notes}


def check_stats_protocol(path: str | os.PathLike, protocol: str) -> list[str]:
    """Refuse real statistics saved under another protocol (frames, start, stride, clips); a note when the
    file does not say (statistics from elsewhere)."""
    with np.load(path) as z:
        stored = str(z["protocol"]) if "protocol" in z.files else None
    if stored is None:
        return [f"{Path(path).name}: its protocol is not recorded; make sure it is: {protocol}"]
    if stored != protocol:
        raise ValueError(f"{path} holds statistics made under another protocol:\n  theirs: {stored}\n  "
                         f"this run: {protocol}\nuse the same --frames/--clip-start/--stride/--max-clips, "
                         "or compute the real statistics again")
    return []


class InceptionFrames:
    """FID-Inception pool_3 features of video frames: the feature extractor of framewise FID.

    ``inception``: a :class:`~selfflow.eval.inception.FIDInceptionV3` (or a module with its call
    convention: uint8 (B, H, W, 3) in, ``.pool`` (B, D) out) on ``device``.
    """

    def __init__(self, inception: Any, device: str | torch.device = "cpu") -> None:
        self.inception = inception
        self.device = torch.device(device)

    @torch.no_grad()
    def features(self, frames: list[np.ndarray]) -> np.ndarray:
        x = torch.from_numpy(np.stack(frames)).to(self.device)  # (B, H, W, 3) uint8
        return self.inception(x, spatial=False, logits=False).pool.double().cpu().numpy()


def frame_stats(source: VideoSource, inception: Any, *, max_frames: int = MAX_FRAMES_FID,
                batch_size: int = 50, device: str = "cpu", progress: bool = True,
                desc: str = "Inception frames") -> FeatureStats:
    """Biased ``FeatureStats`` of FID-Inception pool features of the frames of a video set."""
    return extract_stats(InceptionFrames(inception, device), iter_frames(source, max_frames),
                         batch_size=batch_size, biased=True, split_on_shape=True, desc=desc,
                         unit="frame", progress=progress)


def fid_frames(fake: VideoSource, real: VideoSource,
               inception: Any | str | os.PathLike | None = None, *,
               max_frames: int = MAX_FRAMES_FID, batch_size: int = 50, device: str = "cpu",
               progress: bool = True) -> dict[str, Any]:
    """Framewise FID: flatten both video sets into frames and compare FID-Inception statistics.
    ``inception``: a loaded ``FIDInceptionV3``, the path of its weights, or None for the
    default lookup of ``selfflow.eval.inception``."""
    from .inception import load_inception

    preview_notes = listed_sets(fake, real, list_videos, is_stats_file)
    if inception is None or isinstance(inception, (str, os.PathLike)):
        inception = load_inception(inception, device=device)
    weights = str(getattr(inception, "weights_path", "in-memory model"))
    kw = {"max_frames": max_frames, "batch_size": batch_size, "device": device,
          "progress": progress}
    s_real = FeatureStats.load(real) if is_stats_file(real) else frame_stats(
        real, inception, desc="Inception real frames", **kw)
    s_fake = frame_stats(fake, inception, desc="Inception fake frames", **kw)
    value, notes = checked_distance("framewise FID", s_fake, s_real)
    return {"fid_frames": float(value), "protocol": PROTOCOL_FID.format(max_frames=max_frames),
            "weights": weights, "n_fake": int(s_fake.count), "n_real": int(s_real.count),
            "notes": preview_notes + notes}
