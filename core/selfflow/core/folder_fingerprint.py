"""A short digest of a model folder's files: which weights a path holds, whatever the path.

Used where a run must know that a folder it reads is the one it read before (a text encoder's weights
against the captions prepared with it; a VAE or encoder folder moved between a run's sessions).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

WHOLE_BYTES = 16 << 20  # files up to this size are hashed whole; larger ones by their ends
END_BYTES = 1 << 20


def files_fingerprint(model_dir: Path) -> str:
    """A short digest of every file of a model directory (weights, tokenizer, configs; not ``*.md`` or hidden
    files), cheap even for tens of GB: each file's path, size and bytes — whole up to 16 MiB, else its first and
    last MiB, which differ between any two trainings of the same architecture."""
    digest = hashlib.sha256()
    files = sorted(p for p in model_dir.rglob("*") if p.is_file() and p.suffix != ".md"
                   and not any(part.startswith(".") for part in p.relative_to(model_dir).parts))
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.relative_to(model_dir).as_posix()}\0{size}\0".encode())
        with open(path, "rb") as f:
            if size <= WHOLE_BYTES:
                digest.update(f.read())
            else:
                digest.update(f.read(END_BYTES))
                f.seek(size - END_BYTES)
                digest.update(f.read())
    return digest.hexdigest()[:16]
