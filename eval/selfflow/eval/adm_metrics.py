"""Inception Score and improved precision/recall exactly as the ADM evaluator computes them.

Reference: openai/guided-diffusion ``evaluations/evaluator.py`` (itself after openai/improved-gan
and kynkaat/improved-precision-and-recall-metric). Facts reproduced here:

- IS: softmax(pool3 · Wᵀ) in float32 (no bias), consecutive splits of 5000 rows (no shuffle; 50k
  samples → 10 splits), ``exp(mean_i KL(p_i ‖ mean p))`` per split, mean over splits.
- P/R: k = 3; the radius of a point is the squared distance to its 3rd nearest neighbour in its own
  set (the 4th smallest value of its distance row, self included). Squared distances are
  ``max(‖u‖² − 2u·v + ‖v‖², 0)`` computed in **float16** per (10000 × 10000) block, recomputed in
  float32 when the clamped fp16 block has a non-finite entry (clamp first, then test: an overflow
  of 2u·v to −inf is clamped to 0 and kept, as in ADM). A sample counts for precision if it lies
  within (≤) the radius of any reference point; a reference point counts for recall if it lies
  within the radius of any sample.

``fp16=True`` emulates the fp16 arithmetic on any device (inputs, squares, norms, the matmul
output and each addition rounded to float16, with float32 accumulation inside sums/matmuls, as
TF's GPU kernels do); ``fp16=False`` is the exact float32 variant (what PyTorch ports use).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

ADM_SPLIT_SIZE = 5000
ADM_BLOCK = 10000
ADM_K = 3


def inception_score(logits: np.ndarray | torch.Tensor, split_size: int = ADM_SPLIT_SIZE) -> float:
    """ADM's Inception Score from (N, 1008) unbiased logits: mean over consecutive splits."""
    x = torch.as_tensor(logits).detach().cpu().float()
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"logits must have shape (N, C) with N > 0, got {tuple(x.shape)}")
    p = torch.softmax(x, dim=1).numpy()  # float32, like the TF softmax graph
    scores = []
    for start in range(0, len(p), split_size):
        part = p[start:start + split_size]
        marginal = np.mean(part, axis=0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = part * (np.log(part) - np.log(marginal))
        kl = np.where(part > 0, kl, 0.0).astype(np.float32)  # 0·log 0 = 0 instead of NaN
        scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
    return float(np.mean(scores))


def _round16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(torch.float32)


def _round16_(x: torch.Tensor) -> torch.Tensor:
    """Round a float32 tensor to float16 precision in place (overflow → ±inf, as in fp16 math)."""
    return x.copy_(x.to(torch.float16))


def pairwise_sq_distances(u: torch.Tensor, v: torch.Tensor, *, fp16: bool = True) -> torch.Tensor:
    """(len(u), len(v)) squared L2 distances ``max(‖u‖² − 2u·v + ‖v‖², 0)`` as float32.

    ``fp16``: ADM's float16 graph — every op's output rounded to fp16 (float32 accumulation inside
    the sums and the matmul), clamped at 0; if the clamped block is not finite, the whole block is
    recomputed in float32.
    Works in place on one (len(u), len(v)) buffer to bound memory for 10000² blocks.
    """
    u32, v32 = u.float(), v.float()
    if fp16:
        u16, v16 = _round16(u32), _round16(v32)
        nu = _round16(_round16(u16 * u16).sum(1, keepdim=True))
        nv = _round16(_round16(v16 * v16).sum(1, keepdim=True)).T
        d = _round16_(u16 @ v16.T)
        _round16_(d.mul_(-2.0))  # −2·mm: exact in fp16 unless it overflows
        _round16_(d.add_(nu))  # ‖u‖² − 2u·v
        _round16_(d.add_(nv))  # … + ‖v‖²
        # ADM clamps before its finiteness test: a −inf (2u·v overflowed while the norms fit)
        # becomes 0 and the fp16 block is kept; only +inf or NaN falls back to float32.
        d.clamp_min_(0.0)
        if torch.isfinite(d).all():
            return d
        del d
    nu = (u32 * u32).sum(1, keepdim=True)
    nv = (v32 * v32).sum(1, keepdim=True).T
    return (u32 @ v32.T).mul_(-2.0).add_(nu).add_(nv).clamp_min_(0.0)


def manifold_radii(features: np.ndarray | torch.Tensor, *, k: int = ADM_K, block: int = ADM_BLOCK,
                   fp16: bool = True) -> torch.Tensor:
    """Squared distance from each point to its k-th nearest neighbour in the same set (self excluded).

    Blocks of ``block`` rows × ``block`` columns like ADM (this also fixes the fp16-fallback
    granularity); only the k+1 smallest values per row are kept, so memory is O(block²).
    """
    features = torch.as_tensor(features)
    n = features.shape[0]
    if n <= k:
        raise ValueError(f"need more than k={k} feature vectors for the radii, got {n}")
    radii = torch.empty(n, dtype=torch.float32, device=features.device)
    for r0 in range(0, n, block):
        rows = features[r0:r0 + block]
        best: torch.Tensor | None = None
        for c0 in range(0, n, block):
            d = pairwise_sq_distances(rows, features[c0:c0 + block], fp16=fp16)
            cand = d if best is None else torch.cat([best, d], dim=1)
            best = torch.topk(cand, min(k + 1, cand.shape[1]), dim=1, largest=False).values
        assert best is not None
        radii[r0:r0 + block] = best[:, k]
    return radii


@dataclass
class PrecisionRecall:
    precision: float
    recall: float


def precision_recall(ref: np.ndarray | torch.Tensor, samples: np.ndarray | torch.Tensor, *, k: int = ADM_K,
                     block: int = ADM_BLOCK, fp16: bool = True, ref_radii: np.ndarray | torch.Tensor | None = None,
                     sample_radii: np.ndarray | torch.Tensor | None = None) -> PrecisionRecall:
    """ADM's improved precision/recall of ``samples`` against ``ref`` (both (N, D) features, numpy or
    torch; tensors stay on their device)."""
    ref, samples = torch.as_tensor(ref), torch.as_tensor(samples)
    if ref.ndim != 2 or samples.ndim != 2 or ref.shape[1] != samples.shape[1]:
        raise ValueError(f"features must be (N, D) with equal D, got {tuple(ref.shape)} and {tuple(samples.shape)}")
    ref_r = (manifold_radii(ref, k=k, block=block, fp16=fp16) if ref_radii is None
             else torch.as_tensor(ref_radii, device=ref.device))
    smp_r = (manifold_radii(samples, k=k, block=block, fp16=fp16) if sample_radii is None
             else torch.as_tensor(sample_radii, device=samples.device))
    ref_in = torch.zeros(ref.shape[0], dtype=torch.bool, device=ref.device)
    smp_in = torch.zeros(samples.shape[0], dtype=torch.bool, device=samples.device)
    for r0 in range(0, ref.shape[0], block):
        rb = ref[r0:r0 + block]
        for s0 in range(0, samples.shape[0], block):
            d = pairwise_sq_distances(rb, samples[s0:s0 + block], fp16=fp16)
            ref_in[r0:r0 + block] |= (d <= smp_r[s0:s0 + block][None, :]).any(dim=1)
            smp_in[s0:s0 + block] |= (d <= ref_r[r0:r0 + block][:, None]).any(dim=0)
    return PrecisionRecall(precision=float(smp_in.double().mean()), recall=float(ref_in.double().mean()))
