"""The feature-extractor interface every Fréchet metric is built on, and the one batching loop.

A metric is: a media reader (``image_io``, ``video_io``, ``audio_io``) yielding uint8 images, clips
or waveform windows → an extractor's ``features(batch)`` → :class:`~selfflow.eval.frechet.FeatureStats`
→ :func:`~selfflow.eval.frechet.checked_distance`. Extractors (DINOv2, CLIP, I3D, CLAP, the FID
Inception) load their weights from local paths and know their preprocessing; this module only
batches items, shows progress and collects the (B, D) float64 features — in exact fp32: every
extractor runs with TF32 off (see :func:`exact_fp32`), so features do not depend on the GPU's defaults.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from .frechet import FeatureStats


class FeatureExtractor(Protocol):
    """A network that maps a batch of media items (uint8 images/clips, float windows) to features."""

    def features(self, batch: list[np.ndarray]) -> np.ndarray:
        """(B, D) float64 features of ``batch`` (B items, each as the reader yields it)."""
        ...


@contextmanager
def exact_fp32() -> Iterator[None]:
    """TF32 off for cuBLAS and cuDNN for the duration, then restored. On Ampere and later, TF32 (cuDNN's
    default for convolutions, and a run's ``train.tf32``) moves features by ~1e-3 relative — enough to shift a
    Fréchet distance between two runs that differ only in the GPU's settings."""
    old = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def batched(items: Iterable[Any], size: int, *, split_on_shape: bool = False) -> Iterator[list[Any]]:
    """Consecutive groups of ``size`` items; with ``split_on_shape`` a group also ends where the
    item shape changes (for networks that stack their inputs into one tensor)."""
    batch: list[Any] = []
    for item in items:
        if split_on_shape and batch and item.shape != batch[0].shape:
            yield batch
            batch = []
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _feature_batches(extractor: FeatureExtractor, items: Iterable[np.ndarray], *, batch_size: int,
                     split_on_shape: bool, total: int | None, desc: str, unit: str,
                     progress: bool) -> Iterator[np.ndarray]:
    with tqdm(total=total, desc=desc, unit=unit, disable=not progress) as bar:
        for batch in batched(items, batch_size, split_on_shape=split_on_shape):
            with exact_fp32():
                feats = extractor.features(batch)
            yield feats
            bar.update(len(batch))


def extract(extractor: FeatureExtractor, items: Iterable[np.ndarray], *, batch_size: int,
            split_on_shape: bool = False, total: int | None = None, desc: str = "features",
            unit: str = "item", progress: bool = True) -> np.ndarray:
    """All features of ``items`` as one (N, D) float64 array, in item order."""
    feats = list(_feature_batches(extractor, items, batch_size=batch_size, split_on_shape=split_on_shape,
                                  total=total, desc=desc, unit=unit, progress=progress))
    if not feats:
        raise ValueError(f"{desc}: nothing to embed (no {unit}s)")
    return np.concatenate(feats).astype(np.float64)


def extract_stats(extractor: FeatureExtractor, items: Iterable[np.ndarray], *, batch_size: int,
                  biased: bool = False, split_on_shape: bool = False, total: int | None = None,
                  desc: str = "features", unit: str = "item", progress: bool = True) -> FeatureStats:
    """Streaming :class:`FeatureStats` of the features of ``items`` (no (N, D) array is kept)."""
    stats = FeatureStats(biased=biased)
    for feats in _feature_batches(extractor, items, batch_size=batch_size, split_on_shape=split_on_shape,
                                  total=total, desc=desc, unit=unit, progress=progress):
        stats.update(feats)
    return stats
