"""A built-in text encoder for embedded runs: deterministic, tiny, no downloads.

Captions are lower-cased and split into words (runs of letters and digits). Each word's embedding is a
fixed standard-normal vector drawn from a generator seeded by a BLAKE2 hash of the word, so every word —
including ones never seen before — has the same vector in every process, on every machine, forever (no
vocabulary file, no training). A sinusoidal code of the word's position is added so that word order is
visible to the backbone (context tokens all share RoPE position 0). It carries no meaning beyond word
identity and order — enough to condition toy data on captions like "a red square moving left".
"""

from __future__ import annotations

import hashlib
import math
import re

import numpy as np
import torch

from .encoder import TextEncoder

_WORD = re.compile(r"[a-z0-9]+")


def tokenize(text: str) -> list[str]:
    """``"A C-major chord!"`` → ``["a", "c", "major", "chord"]``."""
    return _WORD.findall(text.lower())


def word_vector(word: str, dim: int) -> np.ndarray:
    """The fixed ``(dim,)`` float32 vector of ``word``."""
    seed = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
    return np.random.default_rng(seed).standard_normal(dim).astype(np.float32)


def position_code(n: int, dim: int) -> torch.Tensor:
    """``(n, dim)`` sinusoidal position code with amplitude 0.5 (smaller than the word vectors)."""
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    freq = torch.exp(-math.log(100.0) * torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    code = torch.zeros(n, dim)
    code[:, 0::2] = torch.sin(pos * freq)
    code[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return 0.5 * code


class TinyTextEncoder(TextEncoder):
    """Hashed word vectors + position code; ``Li`` = number of words (capped at ``max_length``)."""

    def __init__(self, dim: int = 64, max_length: int = 64):
        self.dim, self.max_length = dim, max_length
        self.cache_id = f"tiny-hashed-words-v1:dim={dim}:max={max_length}"
        self._vectors: dict[str, torch.Tensor] = {}

    def _vector(self, word: str) -> torch.Tensor:
        if word not in self._vectors:
            self._vectors[word] = torch.from_numpy(word_vector(word, self.dim))
        return self._vectors[word]

    def encode_unpadded(self, texts: list[str]) -> list[torch.Tensor]:
        out = []
        for text in texts:
            words = tokenize(text)[: self.max_length]
            if not words:
                out.append(torch.zeros(0, self.dim))
                continue
            out.append(torch.stack([self._vector(w) for w in words]) + position_code(len(words), self.dim))
        return out
