"""An on-disk cache of caption embeddings, keyed by (encoder, caption).

One safetensors file per caption, holding the *unpadded* ``(Li, D)`` embedding as the encoder produced it
(float32): a cached and a fresh encoding are identical. The key is SHA-256 of the encoder's ``cache_id``
(model, config hash, layers, max length), its ``weights_id`` (weights, tokenizer, dtype) and the caption, so
changing any of them — new weights in the same directory included — never returns a stale entry. Writes
are atomic (temporary file + rename), so concurrent ranks and crashes leave no half files.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .encoder import TextEncoder


def cache_key(cache_id: str, weights_id: str, text: str) -> str:
    return hashlib.sha256(f"{cache_id}\n{weights_id}\n{text}".encode()).hexdigest()


class CachedTextEncoder(TextEncoder):
    """Wraps an encoder; only captions missing from ``cache_dir`` reach it (in one batch)."""

    def __init__(self, encoder: TextEncoder, cache_dir: str | Path):
        self.encoder, self.root = encoder, Path(cache_dir)
        self.dim, self.cache_id, self.weights_id = encoder.dim, encoder.cache_id, encoder.weights_id
        self.hits = self.misses = 0

    def path(self, text: str) -> Path:
        key = cache_key(self.cache_id, self.weights_id, text)
        return self.root / key[:2] / f"{key}.safetensors"

    def encode_unpadded(self, texts: list[str]) -> list[torch.Tensor]:
        out: dict[int, torch.Tensor] = {}
        missing: list[int] = []
        for i, text in enumerate(texts):
            p = self.path(text)
            if p.is_file():
                out[i] = load_file(str(p))["emb"]
            else:
                missing.append(i)
        self.hits += len(out)
        self.misses += len(missing)
        if missing:
            fresh = self.encoder.encode_unpadded([texts[i] for i in missing])
            for i, emb in zip(missing, fresh):
                self._store(texts[i], emb)
                out[i] = emb
        return [out[i] for i in range(len(texts))]

    def _store(self, text: str, emb: torch.Tensor) -> None:
        p = self.path(text)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f"{p.name}.{os.getpid()}.tmp")
        save_file({"emb": emb.contiguous()}, str(tmp), metadata={"cache_id": self.cache_id,
                                                                    "weights_id": self.weights_id})
        tmp.replace(p)
