"""Feature statistics and the Fréchet distance shared by FID, sFID, FD-DINOv2, FVD and FAD.

Statistics are accumulated in float64 with Chan's parallel update (count, mean, centred scatter), so
streaming batches, merging ranks and a single ``np.cov`` over the concatenation agree to round-off —
a float32 ``Σxxᵀ`` accumulator is a known source of wrong FIDs (torcheval#192).

The distance uses the symmetric form ``tr √(√Σ1 Σ2 √Σ1)`` (two symmetric eigen-decompositions)
instead of ``scipy.linalg.sqrtm(Σ1 Σ2)``: it is mathematically identical for PSD inputs, faster, and
immune to the sqrtm regressions and the removal of ``disp=`` in scipy 1.18.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor


class MetricNote(UserWarning):
    """A caveat about a metric's value (few samples, other weights, a complex square root): warned for library
    callers, and listed under ``notes`` in the results, which ``selfflow eval`` prints, not warning twice."""


def _as_float64_tensor(x: Any, device: torch.device | None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        t = torch.from_numpy(np.asarray(x))
    return t.to(device=device if device is not None else t.device, dtype=torch.float64)


class FeatureStats:
    """Streaming mean / covariance of feature vectors, accumulated in float64.

    ``update`` takes (N, D) batches (numpy or torch, any float dtype, any device); ``merge`` combines
    the statistics of disjoint sets (e.g. one per rank). ``cov`` is unbiased (ddof=1, like
    ``np.cov(x, rowvar=False)``, the FID convention) unless ``biased=True`` (divide by N, the
    StyleGAN-V FVD convention).
    """

    def __init__(self, dim: int | None = None, *, biased: bool = False,
                 device: torch.device | str | None = None) -> None:
        self.biased = biased
        self.device = torch.device(device) if device is not None else None
        self.count = 0
        self._mean: torch.Tensor | None = None
        self._m2: torch.Tensor | None = None  # Σ (x - mean)(x - mean)ᵀ
        self.dim = dim
        if dim is not None:
            self._mean = torch.zeros(dim, dtype=torch.float64, device=self.device)
            self._m2 = torch.zeros(dim, dim, dtype=torch.float64, device=self.device)

    # -- accumulation -------------------------------------------------------------------------
    def _combine(self, n_b: int, mean_b: torch.Tensor, m2_b: torch.Tensor) -> None:
        if n_b == 0:
            return
        if self.dim is None:
            self.dim = int(mean_b.shape[0])
        if mean_b.shape != (self.dim,) or m2_b.shape != (self.dim, self.dim):
            raise ValueError(f"feature dimension mismatch: stats hold D={self.dim}, got D={mean_b.shape[0]}")
        if self.count == 0 or self._mean is None or self._m2 is None:
            self.count, self._mean, self._m2 = n_b, mean_b.clone(), m2_b.clone()
            self.device = self._mean.device
            return
        mean_b, m2_b = mean_b.to(self._mean.device), m2_b.to(self._mean.device)
        n_a, n = self.count, self.count + n_b
        delta = mean_b - self._mean
        self._mean = self._mean + delta * (n_b / n)
        self._m2 = self._m2 + m2_b + torch.outer(delta, delta) * (n_a * n_b / n)
        self.count = n

    def update(self, features: ArrayLike) -> FeatureStats:
        """Add a batch of shape (N, D). Returns self (for chaining)."""
        x = _as_float64_tensor(features, self.device)
        if x.ndim != 2:
            raise ValueError(f"features must have shape (N, D), got {tuple(x.shape)}")
        if x.shape[0] == 0:
            return self
        if not torch.isfinite(x).all():
            raise ValueError("features contain NaN or Inf; refusing to pollute the statistics")
        mean_b = x.mean(dim=0)
        xc = x - mean_b
        self._combine(int(x.shape[0]), mean_b, xc.T @ xc)
        return self

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Fold the statistics of a disjoint set into self. Returns self."""
        if other.count == 0:
            return self
        if other._mean is None or other._m2 is None:
            raise ValueError("cannot merge statistics that were loaded without their scatter matrix")
        self._combine(other.count, other._mean, other._m2)
        return self

    # -- results ----------------------------------------------------------------------------
    @property
    def mean(self) -> np.ndarray:
        if self.count == 0 or self._mean is None:
            raise ValueError("no features were accumulated")
        return self._mean.cpu().numpy()

    def covariance(self, biased: bool | None = None) -> np.ndarray:
        biased = self.biased if biased is None else biased
        if self.count == 0 or self._m2 is None:
            raise ValueError("no features were accumulated")
        denom = self.count if biased else self.count - 1
        if denom <= 0:
            raise ValueError("an unbiased covariance needs at least 2 feature vectors")
        return (self._m2 / denom).cpu().numpy()

    @property
    def cov(self) -> np.ndarray:
        return self.covariance()

    # -- persistence (ADM / pytorch-fid layout: mu, sigma) ----------------------------------------
    def state(self) -> dict[str, torch.Tensor | int]:
        """Tensors for collective communication: count, mean, scatter."""
        if self._mean is None or self._m2 is None:
            raise ValueError("empty statistics have no state (pass dim= to the constructor)")
        return {"count": self.count, "mean": self._mean, "m2": self._m2}

    @classmethod
    def from_state(cls, count: int, mean: ArrayLike, m2: ArrayLike, *, biased: bool = False) -> FeatureStats:
        st = cls(biased=biased)
        mean_t, m2_t = _as_float64_tensor(mean, None), _as_float64_tensor(m2, None)
        st._combine(int(count), mean_t, m2_t)
        return st

    def npz_dict(self, prefix: str = "") -> dict[str, np.ndarray]:
        """``{mu, sigma, count, biased}`` (keys suffixed by ``prefix``, e.g. ``_s`` for sFID)."""
        return {f"mu{prefix}": self.mean, f"sigma{prefix}": self.cov,
                f"count{prefix}": np.asarray(self.count, dtype=np.int64),
                f"biased{prefix}": np.asarray(self.biased)}

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``mu``, ``sigma``, ``count`` (+ ``biased``) to ``path`` atomically."""
        return save_npz_atomic(path, self.npz_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str], prefix: str = "") -> FeatureStats:
        """Read ``mu``/``sigma`` (ADM reference files, pytorch-fid stats, our own files).

        Without a stored ``count`` the scatter matrix cannot be recovered: such statistics can be
        read (``mean``/``cov``) but not updated or merged.
        """
        with np.load(path) as z:
            keys = set(z.files)
            for k in (f"mu{prefix}", f"sigma{prefix}"):
                if k not in keys:
                    raise KeyError(f"{path}: no key {k!r} (keys: {sorted(keys)})")
            mu = z[f"mu{prefix}"].astype(np.float64)
            sigma = z[f"sigma{prefix}"].astype(np.float64)
            count = int(z[f"count{prefix}"]) if f"count{prefix}" in keys else None
            biased = bool(z[f"biased{prefix}"]) if f"biased{prefix}" in keys else False
        return cls.from_moments(mu, sigma, count=count, biased=biased)

    @classmethod
    def from_moments(cls, mu: ArrayLike, sigma: ArrayLike, *, count: int | None = None,
                     biased: bool = False) -> FeatureStats:
        mu_t, sigma_t = _as_float64_tensor(mu, None), _as_float64_tensor(sigma, None)
        if mu_t.ndim != 1 or sigma_t.shape != (mu_t.shape[0], mu_t.shape[0]):
            raise ValueError(f"mu must be (D,) and sigma (D, D); got {tuple(mu_t.shape)}, {tuple(sigma_t.shape)}")
        if count is not None:
            denom = count if biased else count - 1
            return cls.from_state(count, mu_t, sigma_t * denom, biased=biased)
        return _FrozenStats(mu_t, sigma_t, biased=biased)

    def __repr__(self) -> str:
        return f"FeatureStats(count={self.count}, dim={self.dim}, biased={self.biased})"


class _FrozenStats(FeatureStats):
    """Precomputed statistics without a sample count (e.g. ADM's reference ``mu``/``sigma``)."""

    def __init__(self, mu: torch.Tensor, sigma: torch.Tensor, *, biased: bool) -> None:
        super().__init__(biased=biased)
        self.dim = int(mu.shape[0])
        self._mu, self._sigma = mu, sigma
        self.count = -1  # unknown

    @property
    def mean(self) -> np.ndarray:
        return self._mu.numpy()

    def covariance(self, biased: bool | None = None) -> np.ndarray:
        if biased is not None and biased != self.biased:
            raise ValueError("precomputed statistics without a count cannot change their normalisation")
        return self._sigma.numpy()

    def update(self, features: ArrayLike) -> FeatureStats:
        raise ValueError("precomputed statistics (no stored count) cannot be updated")

    def merge(self, other: FeatureStats) -> FeatureStats:
        raise ValueError("precomputed statistics (no stored count) cannot be merged")

    def npz_dict(self, prefix: str = "") -> dict[str, np.ndarray]:
        return {f"mu{prefix}": self.mean, f"sigma{prefix}": self.cov}

    def state(self) -> dict[str, torch.Tensor | int]:
        raise ValueError("precomputed statistics (no stored count) cannot be gathered or merged")


def save_npz_atomic(path: str | os.PathLike[str], arrays: dict[str, Any]) -> Path:
    """``np.savez`` to a temporary file then rename, so a crash never leaves a truncated file."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"statistics files must end in .npz, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.npz")
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _to_numpy64(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


# The reference codes reject a sqrtm whose diagonal has an imaginary part above 1e-3 (§1.1 of the
# anchors); here the same defect shows as negative eigenvalues of √Σ1 Σ2 √Σ1, whose clipped square
# roots are that imaginary trace.
IMAGINARY_TRACE_TOL = 1e-3


def _frechet_terms(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike,
                   sigma2: ArrayLike) -> tuple[float, float, float]:
    """(distance, imaginary trace Σ√|λ⁻| dropped by clipping negative eigenvalues, the scale
    ‖μ1−μ2‖² + tr Σ1 + tr Σ2 that round-off is relative to), in float64."""
    m1, m2 = _to_numpy64(mu1).reshape(-1), _to_numpy64(mu2).reshape(-1)
    s1, s2 = np.atleast_2d(_to_numpy64(sigma1)), np.atleast_2d(_to_numpy64(sigma2))
    d = m1.shape[0]
    if m2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"shape mismatch: mu1 {m1.shape}, sigma1 {s1.shape}, mu2 {m2.shape}, sigma2 {s2.shape}")
    for name, a in (("mu1", m1), ("sigma1", s1), ("mu2", m2), ("sigma2", s2)):
        if not np.isfinite(a).all():
            raise ValueError(f"{name} contains NaN or Inf")
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    inner = root1 @ s2 @ root1
    lam = np.linalg.eigvalsh((inner + inner.T) / 2)
    tr_covmean = float(np.sqrt(np.clip(lam, 0.0, None)).sum())
    imaginary = float(np.sqrt(np.clip(-lam, 0.0, None)).sum())
    diff = m1 - m2
    scale = float(diff @ diff + np.trace(s1) + np.trace(s2))
    return scale - 2.0 * tr_covmean, imaginary, scale


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    ``‖μ1−μ2‖² + tr Σ1 + tr Σ2 − 2 tr √(√Σ1 Σ2 √Σ1)``; tiny negative eigenvalues from round-off are
    clipped to 0. The result is not clamped (identical inputs may give ≈ −1e-9·scale).
    """
    return _frechet_terms(mu1, sigma1, mu2, sigma2)[0]


# Identical sets give FD ≈ −1e-9·scale (and ≈ −1e-8 relative when N < D): not worth a note.
NEGATIVE_REL_TOL = 1e-6


def frechet_notes(metric: str, value: float, *, dim: int, counts: dict[str, int],
                  imaginary_trace: float = 0.0, scale: float = 0.0) -> list[str]:
    """Why a Fréchet distance should not be trusted, one line each; each is also a ``UserWarning``.

    ``counts``: feature vectors per side (``{"samples": 8, "ref": 50000}``; a count ≤ 0 means
    unknown, as for precomputed statistics). Flags N below the feature dimension (a singular
    covariance: the distance is mostly estimator bias), a distance negative beyond round-off
    (``< −1e-6·scale``, ``scale = ‖Δμ‖² + tr Σ1 + tr Σ2``) and a complex matrix square root (both
    numerical breakdowns, typically of the former).
    """
    notes = [f"{metric}: only {n} {side} feature vectors for a {dim}-d feature; the covariance is "
             f"singular and the distance is dominated by small-N bias (use at least {dim})"
             for side, n in counts.items() if 0 < n < dim]
    if value < -NEGATIVE_REL_TOL * scale:
        notes.append(f"{metric} is negative ({value:.6g}): the statistics are numerically degenerate "
                     "and the value is meaningless")
    if imaginary_trace > IMAGINARY_TRACE_TOL:
        notes.append(f"{metric}: the matrix square root is complex (imaginary trace "
                     f"{imaginary_trace:.3g} > {IMAGINARY_TRACE_TOL}); reference implementations "
                     "reject such statistics")
    for note in notes:
        warnings.warn(note, MetricNote, stacklevel=2)
    return notes


def checked_distance(metric: str, a: FeatureStats | ArrayLike, b: FeatureStats | ArrayLike) -> tuple[float, list[str]]:
    """``frechet_distance`` of two ``FeatureStats`` — or of two sets of features ``(N, D)`` (numpy or torch),
    taken as the statistics of one batch each — and the :func:`frechet_notes` about it."""
    a, b = (s if isinstance(s, FeatureStats) else FeatureStats().update(s) for s in (a, b))
    value, imaginary, scale = _frechet_terms(a.mean, a.cov, b.mean, b.cov)
    dim = int(a.mean.shape[0])
    notes = frechet_notes(metric, value, dim=dim, counts={"generated": a.count, "reference": b.count},
                          imaginary_trace=imaginary, scale=scale)
    return value, notes


def stats_distance(a: FeatureStats, b: FeatureStats) -> float:
    """``frechet_distance`` of two ``FeatureStats``."""
    return frechet_distance(a.mean, a.cov, b.mean, b.cov)
