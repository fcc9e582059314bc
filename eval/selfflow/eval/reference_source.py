"""What a saved reference (``--save-real-stats``, ``--save-ref-stats``) records of the network that made it.

A Fréchet distance between features of two networks, or of two weight files of one network, is a number with no
meaning — and nothing in ``mu``/``sigma`` tells. ``selfflow eval stats`` has always kept its Inception weights'
sha256 (``adm_eval.check_stats_weights``); the I3D and DINOv2 references keep the same now: the feature network's
name and its weights' sha256, checked when the file is read back. A file from before (or from elsewhere) without
them is read as it is.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from .inception import sha256_file


def weights_digest(path: str | os.PathLike[str]) -> str:
    """sha256 of a weights file; of a model directory (a Hugging Face folder), of its files' names and digests."""
    p = Path(path)
    if not p.is_dir():
        return sha256_file(p)
    h = hashlib.sha256()
    for f in sorted(q for q in p.rglob("*") if q.is_file()):
        h.update(f"{f.relative_to(p).as_posix()} {sha256_file(f)}\n".encode())
    return h.hexdigest()


def source_record(feature: str, weights: str | os.PathLike[str] | None) -> dict[str, np.ndarray]:
    """The arrays a saved reference keeps beside its statistics: ``feature`` (the network) and, for weights given
    as a path, ``weights_sha256``."""
    out = {"feature": np.asarray(feature)}
    if weights is not None:
        out["weights_sha256"] = np.asarray(weights_digest(weights))
    return out


def check_source(path: str | os.PathLike[str], feature: str, weights: str | os.PathLike[str] | None) -> None:
    """Refuse, before any features are extracted, a reference of another network or of other weights."""
    with np.load(path) as z:
        stored = {k: str(z[k]) for k in ("feature", "weights_sha256") if k in z.files}
        if "inception_sha256" in z.files:  # `selfflow eval stats` (ADM layout), which keeps its own record
            stored.setdefault("feature", "inception")
    if stored.get("feature", feature) != feature:
        raise ValueError(f"{path} holds {stored['feature']} statistics, not {feature} ones: give a reference saved "
                         "by this metric")
    if ("weights_sha256" in stored and weights is not None
            and (digest := weights_digest(weights)) != stored["weights_sha256"]):
        raise ValueError(f"{path} holds statistics of {feature} weights with sha256 "
                         f"{stored['weights_sha256'][:16]}…, but {weights} is {digest[:16]}…: both sides must "
                         "come from the same network; save the reference again with these weights")
