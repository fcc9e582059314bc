"""Probe metrics for the embedded digits dataset (``dataset: digits``), as :mod:`.probe` has for shapes.

The same small CNN (:class:`~.probe.ShapesProbe`) is trained on the digits' training split (its own data
order, seed 1000 + seed), deterministic and cached. ``probe_fd`` compares generated samples with the
training split (1,500 images: the distribution the generator learns); ``probe_acc`` is how often the probe
reads the digit a sample was conditioned on. The probe reads 99 % of the 297 test images right at 16 px
(probe-FD 8.9 test vs train split, 3.2 for 297 training images).
"""

from __future__ import annotations

import torch

from selfflow.core.cached_training import cache_file, cached_classifier

from .frechet import FeatureStats
from .probe import ShapesProbe, probe_features, probe_metrics

DIGITS_PROBE_VERSION = 2  # 2: seeded initialisation


def train_digits_probe(seed: int = 0, steps: int = 300, batch: int = 128, image_size: int = 16) -> ShapesProbe:
    """Train (or load from the cache) the probe CNN on the digits' training split."""
    from selfflow.image.digits import digits_batch

    path = cache_file("digits_probe", f"v{DIGITS_PROBE_VERSION}-{seed}-{steps}-{image_size}")
    return cached_classifier(lambda: ShapesProbe(10), path, lambda net, images: net(images)[1],
                             lambda indices: digits_batch(1000 + seed, indices, image_size), steps, batch, seed)


def digits_reference_stats(probe: ShapesProbe, image_size: int = 16) -> FeatureStats:
    """Probe features of the digits' training split."""
    from selfflow.image.digits import digits_split

    feats, _ = probe_features(probe, digits_split("train", image_size)[0])
    return FeatureStats().update(feats)


class DigitsProbeEvaluator:
    """Online evaluator for runs on digits (entry point ``digits_probe``): probe-FD and conditional accuracy."""

    def __init__(self, modality=None):
        size = getattr(getattr(modality, "options", None), "image_size", 16)
        self.size = size
        self.probe = train_digits_probe(image_size=size)
        self.reference = digits_reference_stats(self.probe, size)

    def real_images(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Up to ``n`` images of the test split (297), which the reference (the training split) did not see."""
        from selfflow.image.digits import digits_split

        images, labels = digits_split("test", self.size)
        return images[:n], labels[:n]

    def __call__(self, media: torch.Tensor, labels: torch.Tensor | None) -> dict[str, float]:
        return probe_metrics(media, labels, self.probe, self.reference)
