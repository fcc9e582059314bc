"""scikit-learn's handwritten digits (1,797 8×8 grey images, 10 classes) as an embedded image dataset.

The data ship inside scikit-learn, so nothing is downloaded. A fixed permutation (seed 0) splits them once
into 1,500 training and 297 test images; runs train on the training split only. Images are upsampled
bilinearly from 8×8 to ``size`` (default 16: with patch 2 that is an 8×8 token grid, the same 64 tokens as
32-px shapes with patch 4, so both datasets cost the same per step and the masking ratio acts on the same
number of tokens; at 8×8 with patch 2 a 25 % mask would hide 4 of 16 tokens) and repeated over 3 channels
so the pixel codec, the probes and the samplers treat them like colour images.

A stream sample depends only on ``(seed, index)``: index ``i`` is image ``perm_e[i mod 1500]`` of the
training split, with ``perm_e`` a permutation drawn from ``(seed, e = i // 1500)`` (one epoch each).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

NUM_TRAIN = 1500
CLASS_NAMES = [str(d) for d in range(10)]
CAPTIONS = [f"a handwritten digit {d}" for d in range(10)]


@lru_cache(maxsize=1)
def _split_indices() -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(0).permutation(1797)
    return perm[:NUM_TRAIN], perm[NUM_TRAIN:]


@lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.float32), digits.target.astype(np.int64)  # (1797, 8, 8) in 0…16


@lru_cache(maxsize=4)
def digits_split(split: Literal["train", "test"], size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, 3, size, size)`` in [-1, 1] and labels ``(N,)`` of the fixed split (1,500 / 297)."""
    if split not in ("train", "test"):
        raise ValueError(f"digits split must be 'train' or 'test', got {split!r}")
    images, labels = _raw()
    idx = _split_indices()[split == "test"]
    x = torch.from_numpy(images[idx] / 8.0 - 1.0)[:, None]  # (N, 1, 8, 8)
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.expand(-1, 3, -1, -1).contiguous(), torch.from_numpy(labels[idx])


def digits_batch(seed: int, indices: range | list[int], size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Training-stream samples ``indices`` of stream ``seed``: images ``(B, 3, size, size)`` and labels."""
    images, labels = digits_split("train", size)
    perms: dict[int, np.ndarray] = {}
    picks = []
    for i in indices:
        epoch = i // NUM_TRAIN
        if epoch not in perms:
            perms[epoch] = np.random.default_rng([seed, epoch]).permutation(NUM_TRAIN)
        picks.append(int(perms[epoch][i % NUM_TRAIN]))
    return images[picks], labels[picks]
