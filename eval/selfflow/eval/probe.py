"""Probe metrics for the built-in synthetic datasets: a proxy that needs no downloaded weights.

A small CNN is trained on the synthetic shapes' labels (seconds on a CPU, deterministic by seed, cached).
Two numbers come out of it for a set of generated images:

- ``probe_fd``: the Fréchet distance between the probe's penultimate features of the samples and of
  held-out real data — an FID-like distance in the probe's feature space;
- ``probe_acc``: how often the probe recognises the class a sample was conditioned on.

These are **proxies** for comparing runs of this framework on its toy data, never FID: the probe is a
tiny network trained on 10 classes of coloured shapes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from selfflow.core.cached_training import cache_file, cached_classifier

from .frechet import FeatureStats, stats_distance

PROBE_VERSION = 3  # 2: the shapes renderer changed (larger shapes, plus-shaped crosses); 3: seeded initialisation


class ShapesProbe(nn.Module):
    """Three conv stages (32→16→8 px) → 128-d features → class logits."""

    def __init__(self, num_classes: int = 10, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4 * w, num_classes)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``images (B, 3, H, W)`` in [-1, 1] → ``(features (B, 4w), logits (B, classes))``."""
        f = self.features(images)
        return f, self.head(f)


def train_shapes_probe(seed: int = 0, steps: int = 400, batch: int = 128, image_size: int = 32) -> ShapesProbe:
    """Train (or load from the cache) the probe on synthetic-shapes stream ``1000 + seed``, which no
    training run uses by default (runs use data seed 0)."""
    from selfflow.image.synthetic_shapes import CLASS_NAMES, render_batch

    path = cache_file("shapes_probe", f"v{PROBE_VERSION}-{seed}-{steps}-{image_size}")
    return cached_classifier(lambda: ShapesProbe(len(CLASS_NAMES)), path, lambda net, images: net(images)[1],
                             lambda indices: render_batch(1000 + seed, indices, image_size), steps, batch, seed)


@torch.no_grad()
def probe_features(probe: ShapesProbe, images: torch.Tensor, batch: int = 256
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    feats, preds = [], []
    for i in tqdm(range(0, len(images), batch), desc="probe features", unit="batch", leave=False, disable=None):
        f, logits = probe(images[i:i + batch].float().cpu())
        feats.append(f)
        preds.append(logits.argmax(-1))
    return torch.cat(feats), torch.cat(preds)


def reference_stats(probe: ShapesProbe, n: int = 2000, data_seed: int = 7, image_size: int = 32) -> FeatureStats:
    """Probe features of ``n`` held-out real images (a stream no run trains on by default)."""
    from selfflow.image.synthetic_shapes import render_batch

    images, _ = render_batch(data_seed, range(n), image_size)
    feats, _ = probe_features(probe, images)
    return FeatureStats().update(feats)


# Decoded samples are clamped to [-1, 1]; the slack only forgives round-off (bf16, resizing). Images in
# [0, 255] would otherwise give a probe_fd in the millions without any error.
RANGE_TOL = 0.01


def _check_images(images: torch.Tensor) -> None:
    if not images.is_floating_point():
        raise ValueError(f"probe_metrics expects float images in [-1, 1], got dtype {images.dtype} "
                         "(uint8 images: convert with images.float() / 127.5 - 1)")
    if images.numel() and not bool(images.abs().le(1 + RANGE_TOL).all()):
        raise ValueError(f"probe_metrics expects float images in [-1, 1], got values in "
                         f"[{images.min().item():.4g}, {images.max().item():.4g}]")


def probe_metrics(images: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray | Sequence[int] | None,
                  probe: ShapesProbe | None = None, reference: FeatureStats | None = None) -> dict[str, float]:
    """``probe_fd`` (and ``probe_acc`` given the conditioning labels) of float ``images (N, 3, H, W)`` in
    [-1, 1]; ``labels``: N class ids (tensor, array or list)."""
    images = torch.as_tensor(images)
    _check_images(images)
    probe = probe or train_shapes_probe(image_size=images.shape[-1])
    reference = reference or reference_stats(probe, image_size=images.shape[-1])
    feats, preds = probe_features(probe, images)
    out = {"probe_fd": stats_distance(FeatureStats().update(feats), reference)}
    if labels is not None:
        labels = torch.as_tensor(labels).cpu()
        if labels.shape != preds.shape:  # a broadcast would silently score against the wrong labels
            raise ValueError(f"labels must have shape ({len(preds)},) like the images, got {tuple(labels.shape)}")
        out["probe_acc"] = float((preds == labels).float().mean())
    return out


class ShapesProbeEvaluator:
    """Online evaluator for runs on synthetic shapes (entry point ``shapes_probe``): probe-FD and
    conditional accuracy of generated samples; the probe and the reference statistics are built once."""

    def __init__(self, modality=None):
        size = getattr(getattr(modality, "options", None), "image_size", 32)
        self.size = size
        self.probe = train_shapes_probe(image_size=size)
        self.reference = reference_stats(self.probe, image_size=size)

    def real_images(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` real images and their labels that neither the reference (stream 7) nor the probe (stream 1000)
        nor a default run (stream 0) saw: scored like samples, they give the floor of the scores at ``n``."""
        from selfflow.image.synthetic_shapes import render_batch

        return render_batch(8, range(n), self.size)

    def __call__(self, media: torch.Tensor, labels: torch.Tensor | None) -> dict[str, float]:
        return probe_metrics(media, labels, self.probe, self.reference)
