from __future__ import annotations

import numpy as np
import pytest
import torch
from torch_fidelity.metric_isc import isc_features_to_metric

from selfflow.eval.adm_metrics import (
    inception_score,
    manifold_radii,
    pairwise_sq_distances,
    precision_recall,
)

# ---------------------------------------------------------------------------------- Inception Score


def adm_inception_score_numpy(logits: np.ndarray, split_size: int = 5000) -> float:
    """Transcription of ADM's compute_inception_score with a float32 numpy softmax."""
    x = logits.astype(np.float32)
    e = np.exp(x - x.max(axis=1, keepdims=True))
    preds = e / e.sum(axis=1, keepdims=True)
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i:i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def test_inception_score_matches_adm_and_torch_fidelity() -> None:
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(12000, 1008)) * 3).astype(np.float32)
    logits[:, :50] += 6 * rng.normal(size=(12000, 50)).astype(np.float32)
    ours = inception_score(logits)
    assert ours > 2.0
    # 12000 rows → splits 5000, 5000, 2000 (ADM keeps the partial split)
    assert ours == pytest.approx(adm_inception_score_numpy(logits), rel=1e-5)
    # torch-fidelity without shuffling uses the same boundaries when N is a multiple of 5000
    tf = isc_features_to_metric(torch.from_numpy(logits[:10000]), splits=2, shuffle=False)
    assert inception_score(logits[:10000]) == pytest.approx(tf["inception_score_mean"], rel=1e-4)
    # splits matter: a single split gives a different number
    assert inception_score(logits, split_size=12000) != pytest.approx(ours, rel=1e-4)


def test_inception_score_closed_form() -> None:
    # confident and uniformly spread over 10 classes → IS = 10; a constant prediction → IS = 1
    k = 10
    logits = torch.full((10000, 1008), -60.0)
    logits[torch.arange(10000), torch.arange(10000) % k] = 60.0
    assert inception_score(logits) == pytest.approx(k, rel=1e-4)
    assert inception_score(torch.zeros(5000, 1008)) == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(ValueError):
        inception_score(np.zeros((0, 1008)))


# ---------------------------------------------------------------------------------- precision/recall


def brute_force_pr(ref: np.ndarray, smp: np.ndarray, k: int = 3) -> tuple[float, float, np.ndarray, np.ndarray]:
    """Exact float64 k-NN precision/recall (Kynkäänniemi et al.) by full sorting."""
    def sq(a, b):
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    r_ref = np.sort(sq(ref, ref), axis=1)[:, k]  # column 0 is the point itself
    r_smp = np.sort(sq(smp, smp), axis=1)[:, k]
    d = sq(smp, ref)
    precision = float(np.mean((d <= r_ref[None, :]).any(axis=1)))
    recall = float(np.mean((d <= r_smp[:, None]).any(axis=0)))
    return precision, recall, r_ref, r_smp


def adm_pr_numpy(ref: np.ndarray, smp: np.ndarray, *, fp16: bool, k: int = 3) -> tuple[float, float]:
    """Transcription of ADM's DistanceBlock/ManifoldEstimator without blocking (numpy, fp16 rounding
    after every op, float32 accumulation inside sums and matmuls)."""
    def dist(u, v):
        if fp16:
            u, v = u.astype(np.float16), v.astype(np.float16)
            nu = np.square(u).astype(np.float32).sum(1).astype(np.float16)[:, None]
            nv = np.square(v).astype(np.float32).sum(1).astype(np.float16)[None, :]
            mm = (u.astype(np.float32) @ v.astype(np.float32).T).astype(np.float16)
            with np.errstate(over="ignore", invalid="ignore"):  # fp16 overflow is the point
                d16 = np.maximum(nu - np.float16(2) * mm + nv, np.float16(0))
            if np.isfinite(d16).all():
                return d16.astype(np.float32)
            u, v = u.astype(np.float32), v.astype(np.float32)
        nu, nv = np.square(u).sum(1)[:, None], np.square(v).sum(1)[None, :]
        return np.maximum(nu - 2 * (u @ v.T) + nv, 0).astype(np.float32)

    r_ref = np.partition(dist(ref, ref), kth=list(range(k + 1)), axis=1)[:, k]
    r_smp = np.partition(dist(smp, smp), kth=list(range(k + 1)), axis=1)[:, k]
    d = dist(ref, smp)
    recall = float(np.mean((d <= r_smp[None, :]).any(axis=1)))
    precision = float(np.mean((d <= r_ref[:, None]).any(axis=0)))
    return precision, recall


def _feature_sets(seed: int, n_ref: int = 150, n_smp: int = 170, d: int = 8, scale: float = 1.0):
    rng = np.random.default_rng(seed)
    ref = rng.normal(size=(n_ref, d))
    smp = 0.8 * rng.normal(size=(n_smp, d)) + 0.6  # narrower and shifted: P and R both in (0, 1)
    return (scale * ref).astype(np.float32), (scale * smp).astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1])
def test_precision_recall_fp32_equals_brute_force_knn(seed: int) -> None:
    ref, smp = _feature_sets(seed)
    p_ref, r_ref_bf, radii_ref, _ = brute_force_pr(ref.astype(np.float64), smp.astype(np.float64))
    assert 0.05 < p_ref < 0.95 and 0.05 < r_ref_bf < 0.95
    radii = manifold_radii(torch.from_numpy(ref), block=64, fp16=False)  # blocks smaller than N
    np.testing.assert_allclose(radii.numpy(), radii_ref, rtol=1e-4)
    pr = precision_recall(torch.from_numpy(ref), torch.from_numpy(smp), block=64, fp16=False)
    assert (pr.precision, pr.recall) == (p_ref, r_ref_bf)
    # block size must not change the result
    pr_big = precision_recall(torch.from_numpy(ref), torch.from_numpy(smp), block=10000, fp16=False)
    assert (pr_big.precision, pr_big.recall) == (pr.precision, pr.recall)


def test_precision_recall_fp16_emulation_matches_adm_transcription() -> None:
    # pool3-like: non-negative, ‖x‖² in the hundreds, so fp16 rounding is visible in the distances
    rng = np.random.default_rng(2)  # a seed where fp16 and fp32 precision differ by one sample
    ref = rng.gamma(0.6, 0.6, size=(200, 256)).astype(np.float32)
    smp = (rng.gamma(0.6, 0.6, size=(230, 256)) * 1.1).astype(np.float32)
    u, v = torch.from_numpy(ref), torch.from_numpy(smp)
    d16, d32 = pairwise_sq_distances(u, v, fp16=True), pairwise_sq_distances(u, v, fp16=False)
    assert float((d16 - d32).abs().max()) > 0  # the emulation really rounds
    assert torch.equal(d16, d16.half().float())  # values are fp16-representable
    results = {}
    for fp16 in (True, False):
        pr = precision_recall(u, v, block=64, fp16=fp16)
        results[fp16] = (pr.precision, pr.recall)
        assert results[fp16] == adm_pr_numpy(ref, smp, fp16=fp16)
        assert 0.0 < pr.precision < 1.0 and 0.0 < pr.recall < 1.0
    assert results[True] != results[False]


def test_fp16_overflow_falls_back_to_fp32() -> None:
    ref, smp = _feature_sets(5, scale=400.0)  # ‖x‖² ≈ 4e6 > fp16 max 65504
    u, v = torch.from_numpy(ref), torch.from_numpy(smp)
    assert torch.equal(pairwise_sq_distances(u, v, fp16=True), pairwise_sq_distances(u, v, fp16=False))
    a = precision_recall(u, v, block=64, fp16=True)
    b = precision_recall(u, v, block=64, fp16=False)
    assert (a.precision, a.recall) == (b.precision, b.recall)


def test_fp16_cross_term_overflow_keeps_the_clamped_fp16_block() -> None:
    # ‖x‖² ≈ 40000 fits in fp16 (max 65504) but 2u·v ≈ 80000 overflows to −inf. ADM clamps first
    # (max(−inf, 0) = 0), finds the block finite and keeps it: every distance is 0, so every radius is
    # 0 and every point lies within (≤) every ball → precision = recall = 1.
    rng = np.random.default_rng(3)
    ref = rng.normal(size=(40, 8)).astype(np.float32)
    smp = (rng.normal(size=(50, 8)) + 6.0 * np.eye(8)[1]).astype(np.float32)  # far from ref in fp32
    ref[:, 0] += 200.0
    smp[:, 0] += 200.0
    u, v = torch.from_numpy(ref), torch.from_numpy(smp)
    assert float((u * u).sum(1).max()) < 65504 and float((u @ v.T).max()) * 2 > 65504
    assert torch.equal(pairwise_sq_distances(u, v, fp16=True), torch.zeros(40, 50))
    pr16 = precision_recall(u, v, block=64, fp16=True)
    assert (pr16.precision, pr16.recall) == (1.0, 1.0) == adm_pr_numpy(ref, smp, fp16=True)
    pr32 = precision_recall(u, v, block=64, fp16=False)
    assert pr32.precision < 0.5 and pr32.recall < 0.5  # a test-then-clamp order would give these


def test_precision_recall_hand_made() -> None:
    # reference: 10 points on a line, spacing 1 → 3rd-NN radius² is 4 (interior) or 9 (ends)
    ref = torch.zeros(10, 2)
    ref[:, 0] = torch.arange(10.0)
    # samples: 4 on the line (in the reference manifold), 4 far away in a tight cluster
    smp = torch.zeros(8, 2)
    smp[:4, 0] = torch.tensor([0.5, 3.0, 6.2, 8.9])
    smp[4:] = torch.tensor([[100.0, 100.0], [100.0, 101.0], [101.0, 100.0], [101.0, 101.0]])
    pr = precision_recall(ref, smp, block=3, fp16=False)
    assert pr.precision == pytest.approx(0.5)
    # sample radii: line samples' 3rd NN spans the line (large balls), so every ref point is covered
    assert pr.recall == pytest.approx(1.0)
    with pytest.raises(ValueError, match="more than k"):
        manifold_radii(torch.zeros(3, 2))


def test_precision_recall_takes_numpy_like_tensors() -> None:
    # FeatureStats.update and inception_score take numpy features; precision/recall must too
    rng = np.random.default_rng(0)
    ref, smp = rng.normal(size=(40, 4)), rng.normal(size=(30, 4)) + 0.5
    want = precision_recall(torch.from_numpy(ref), torch.from_numpy(smp), block=16, fp16=False)
    assert precision_recall(ref, smp, block=16, fp16=False) == want
    radii = manifold_radii(ref, block=16, fp16=False)
    assert torch.equal(radii, manifold_radii(torch.from_numpy(ref), block=16, fp16=False))
    assert precision_recall(ref, smp, block=16, fp16=False, ref_radii=radii.numpy()) == want
