from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from selfflow.eval.frechet import (
    FeatureStats,
    checked_distance,
    frechet_distance,
    frechet_notes,
    stats_distance,
)


def fd_sqrtm(mu1, s1, mu2, s2) -> float:
    """The pytorch-fid / ADM (TTUR) formula, with sqrtm called without the removed ``disp=``."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if np.iscomplexobj(covmean):
        assert np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3)
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def random_gaussian(rng: np.random.Generator, d: int, n: int, shift: float = 0.0):
    a = rng.standard_normal((n, d)) @ (rng.standard_normal((d, d)) / np.sqrt(d)) + shift
    return a.mean(0), np.cov(a, rowvar=False)


@pytest.mark.parametrize("d,n", [(64, 500), (64, 40), (256, 400)])
def test_fd_matches_scipy_sqrtm(d: int, n: int) -> None:
    rng = np.random.default_rng(d + n)
    mu1, s1 = random_gaussian(rng, d, n)
    mu2, s2 = random_gaussian(rng, d, n, shift=0.3)
    ours, ref = frechet_distance(mu1, s1, mu2, s2), fd_sqrtm(mu1, s1, mu2, s2)
    assert ref > 1.0
    # n=40 < d=64 is rank-deficient: agreement is limited by sqrtm's round-off there
    assert ours == pytest.approx(ref, rel=1e-8 if n > d else 1e-6)


def test_fd_matches_scipy_sqrtm_2048() -> None:
    """Inception size. A dense 2048² sqrtm costs 25–115 s on CI-class CPUs, so the pair is built
    with a known upper-triangular product T = Σ1Σ2 (Σ1 = V D Vᵀ, Σ2 = V⁻ᵀ D⁻¹Λ V⁻¹, T = VΛV⁻¹ with V
    unit upper-triangular): both covariances are dense SPD for our code, while the reference
    ``sqrtm(T)`` skips the Schur step (~2× cheaper) and tr √T = Σ√λ is known exactly."""
    d = 2048
    rng = np.random.default_rng(7)
    v = np.eye(d) + np.triu(rng.standard_normal((d, d)), 1) * (0.5 / np.sqrt(d))
    v_inv = scipy.linalg.solve_triangular(v, np.eye(d))
    lam, diag = rng.uniform(0.2, 3.0, d), rng.uniform(0.2, 3.0, d)
    s1 = (v * diag) @ v.T
    s2 = (v_inv.T * (lam / diag)) @ v_inv
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    assert np.abs(np.tril(s1, -1)).max() > 0.1 and np.abs(np.tril(s2, -1)).max() > 0.1  # dense
    t = np.triu((v * lam) @ v_inv)
    np.testing.assert_allclose(s1 @ s2, t, atol=1e-10)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    covmean = scipy.linalg.sqrtm(t)
    assert np.trace(covmean).real == pytest.approx(np.sqrt(lam).sum(), rel=1e-12)
    diff = mu1 - mu2
    ref = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-8)


def test_fd_closed_forms() -> None:
    rng = np.random.default_rng(0)
    mu1, s1 = random_gaussian(rng, 32, 200)
    mu2 = mu1 + rng.normal(size=32)
    # equal covariances: only the mean term remains
    assert frechet_distance(mu1, s1, mu2, s1) == pytest.approx(float(np.sum((mu1 - mu2) ** 2)), rel=1e-9)
    # diagonal covariances: sum of (sqrt a - sqrt b)^2
    a, b = rng.uniform(0.1, 3, 32), rng.uniform(0.1, 3, 32)
    expect = float(np.sum((np.sqrt(a) - np.sqrt(b)) ** 2) + np.sum((mu1 - mu2) ** 2))
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expect, rel=1e-10)
    # identical statistics: zero up to round-off; torch inputs accepted
    assert abs(frechet_distance(torch.from_numpy(mu1), torch.from_numpy(s1), mu1, s1)) < 1e-8 * np.trace(s1)
    # symmetric in its arguments
    assert frechet_distance(mu1, s1, mu2, np.diag(a)) == pytest.approx(frechet_distance(mu2, np.diag(a), mu1, s1), rel=1e-10)


def test_fd_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.zeros(2), np.array([[1.0, 0], [0, np.nan]]), np.zeros(2), np.eye(2))


def test_streaming_stats_equal_np_cov() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(3.0, 2.0, size=(257, 16)) @ rng.normal(size=(16, 16))
    st = FeatureStats()
    for lo, hi in [(0, 1), (1, 50), (50, 51), (51, 200), (200, 257)]:  # uneven, incl. single rows
        chunk = x[lo:hi]
        st.update(torch.from_numpy(chunk).float() if lo % 2 else chunk)  # numpy and torch
    xf = np.concatenate([x[lo:hi] if lo % 2 == 0 else x[lo:hi].astype(np.float32) for lo, hi in
                         [(0, 1), (1, 50), (50, 51), (51, 200), (200, 257)]]).astype(np.float64)
    assert st.count == 257
    np.testing.assert_allclose(st.mean, xf.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(st.cov, np.cov(xf, rowvar=False), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(st.covariance(biased=True), np.cov(xf, rowvar=False, bias=True), rtol=1e-10, atol=1e-10)
    assert FeatureStats(biased=True).update(xf).cov == pytest.approx(np.cov(xf, rowvar=False, bias=True))


def test_merge_equals_single_pass_and_large_offset_is_stable() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(1e4, 1.0, size=(300, 8))  # large mean: a naive Σxxᵀ − Nμμᵀ loses digits
    a, b = FeatureStats().update(x[:120]), FeatureStats().update(x[120:])
    whole = FeatureStats().update(x)
    a.merge(b)
    np.testing.assert_allclose(a.cov, whole.cov, rtol=1e-9)
    np.testing.assert_allclose(a.cov, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-12)
    assert stats_distance(a, whole) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="dimension mismatch"):
        a.update(np.zeros((2, 9)))


def test_save_load_roundtrip_and_adm_layout(tmp_path) -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(50, 6))
    st = FeatureStats().update(x)
    path = st.save(tmp_path / "stats.npz")
    with np.load(path) as z:
        assert {"mu", "sigma", "count"} <= set(z.files)
        np.testing.assert_allclose(z["sigma"], np.cov(x, rowvar=False), rtol=1e-12)
    back = FeatureStats.load(path)
    assert back.count == 50
    np.testing.assert_allclose(back.cov, st.cov, rtol=1e-12)
    back.update(x)  # with a count, loaded stats can keep accumulating
    np.testing.assert_allclose(back.cov, np.cov(np.concatenate([x, x]), rowvar=False), rtol=1e-10)

    # an ADM / pytorch-fid file: only mu and sigma
    np.savez(tmp_path / "adm.npz", mu=x.mean(0), sigma=np.cov(x, rowvar=False))
    frozen = FeatureStats.load(tmp_path / "adm.npz")
    np.testing.assert_array_equal(frozen.cov, np.cov(x, rowvar=False))
    with pytest.raises(ValueError, match="cannot be updated"):
        frozen.update(x)
    with pytest.raises(KeyError, match="mu_s"):
        FeatureStats.load(tmp_path / "adm.npz", prefix="_s")


def test_checked_distance_notes_negative_and_complex() -> None:
    # Σ2 = diag(4, −4) is not PSD (a broken statistics file): tr√(Σ1Σ2) keeps √4 = 2 and drops the
    # imaginary √4 = 2, so FD = 0 + (2 + 0) − 2·2 = −2 with an imaginary trace of 2
    a = FeatureStats.from_moments(np.zeros(2), np.eye(2))
    b = FeatureStats.from_moments(np.zeros(2), np.diag([4.0, -4.0]))
    with pytest.warns(UserWarning):
        value, notes = checked_distance("FID", a, b)
    assert value == pytest.approx(-2.0)
    assert len(notes) == 2  # counts unknown (precomputed statistics): no small-N note
    assert notes[0].startswith("FID is negative (-2)")
    assert "complex (imaginary trace 2 > 0.001)" in notes[1]


def test_checked_distance_notes_small_n_only_when_below_dim() -> None:
    rng = np.random.default_rng(0)
    few, many = FeatureStats().update(rng.normal(size=(8, 16))), FeatureStats().update(rng.normal(size=(40, 16)))
    with pytest.warns(UserWarning, match="only 8 generated"):
        value, notes = checked_distance("FD", few, many)
    assert value > 0 and notes == [notes[0]] and "16-d" in notes[0]
    assert checked_distance("FD", many, many)[1] == []
    assert frechet_notes("FD", 1.0, dim=16, counts={"x": 16, "y": -1}) == []
    assert frechet_notes("FD", -1e-9, dim=16, counts={}, scale=10.0) == []  # round-off
    with pytest.warns(UserWarning):
        assert frechet_notes("FD", -1e-3, dim=16, counts={}, scale=10.0) != []


def test_checked_distance_takes_features_as_well_as_statistics() -> None:
    rng = np.random.default_rng(0)
    fake, real = rng.normal(size=(300, 8)), rng.normal(0.2, 1.0, size=(300, 8))
    from_stats = checked_distance("FD", FeatureStats().update(fake), FeatureStats().update(real))
    assert checked_distance("FD", fake, torch.from_numpy(real)) == from_stats
    assert from_stats[0] > 0
