"""The shared batching loop of the feature extractors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from selfflow.eval.extractor import batched, extract, extract_stats


class Recorder:
    """A FeatureExtractor that returns [sum, shape[0]] per item and records its batches."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, ...]]] = []

    def features(self, batch: list[np.ndarray]) -> np.ndarray:
        self.batches.append([x.shape for x in batch])
        return np.array([[float(x.sum()), float(x.shape[0])] for x in batch], dtype=np.float32)


def test_batched_sizes_and_shape_splits() -> None:
    items = [np.zeros(s) for s in (2, 2, 2, 3, 3, 2)]
    assert [len(b) for b in batched(items, 2)] == [2, 2, 2]
    assert [[x.shape[0] for x in b] for b in batched(items, 2, split_on_shape=True)] == [[2, 2], [2], [3, 3], [2]]


def test_extract_keeps_order_and_float64() -> None:
    rng = np.random.default_rng(0)
    items = [rng.integers(0, 255, size=(n, 2)).astype(np.uint8) for n in (3, 3, 4, 3)]
    ext = Recorder()
    feats = extract(ext, iter(items), batch_size=3, split_on_shape=True, progress=False)
    assert feats.dtype == np.float64 and feats.shape == (4, 2)
    np.testing.assert_array_equal(feats[:, 0], [x.sum() for x in items])
    assert ext.batches == [[(3, 2), (3, 2)], [(4, 2)], [(3, 2)]]
    with pytest.raises(ValueError, match="nothing to embed"):
        extract(ext, [], batch_size=3, progress=False)


def test_extract_stats_equals_stats_of_all_features() -> None:
    rng = np.random.default_rng(1)
    items = [rng.normal(size=(n,)) for n in rng.integers(1, 6, size=25)]
    stats = extract_stats(Recorder(), items, batch_size=4, biased=True, progress=False)
    feats = np.array([[x.sum(), len(x)] for x in items], dtype=np.float32).astype(np.float64)
    assert stats.count == 25 and stats.biased
    np.testing.assert_allclose(stats.mean, feats.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.cov, np.cov(feats, rowvar=False, bias=True), rtol=1e-10)


class TF32Probe:
    """A FeatureExtractor that records whether TF32 was allowed while it ran."""

    def __init__(self) -> None:
        self.seen: list[tuple[bool, bool]] = []

    def features(self, batch: list[np.ndarray]) -> np.ndarray:
        self.seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        return np.zeros((len(batch), 1))


@pytest.mark.parametrize("collect", [extract, extract_stats])
def test_every_extractor_runs_without_tf32_and_the_settings_come_back(collect) -> None:
    # A training run's train.tf32 (or cuDNN's default) must not reach the features: FID/FVD/FAD of two runs
    # would differ by the GPU's settings alone.
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        probe = TF32Probe()
        collect(probe, [np.zeros(2)] * 5, batch_size=2, progress=False)
        assert probe.seen == [(False, False)] * 3
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
