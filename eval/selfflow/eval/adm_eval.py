"""The ADM evaluation protocol end to end: FID, sFID, IS, precision and recall of a sample batch.

Mirrors ``python evaluator.py REF.npz SAMPLES.npz`` of openai/guided-diffusion:

- the reference side uses its stored ``mu``/``sigma``/``mu_s``/``sigma_s`` when present (for
  ``VIRTUAL_imagenet256_labeled.npz`` they cover the whole training set) and its ``arr_0`` images
  (10k) only for precision/recall;
- the sample side is evaluated from its images (or from stored statistics/features, as ADM does when
  a sample file carries ``mu``…);
- IS over consecutive 5000-sample splits; P/R with k=3 and fp16 distances (see ``adm_metrics``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .adm_metrics import ADM_BLOCK, ADM_K, ADM_SPLIT_SIZE, inception_score, precision_recall
from .extract import extract_activations, pool_to_logits, rank
from .frechet import FeatureStats, checked_distance, save_npz_atomic
from .image_io import (
    STAT_KEYS,
    FolderImages,
    ImageSource,
    image_size,
    npz_keys,
    open_images,
    read_reference_stats,
)
from .inception import WEIGHTS_NAME, WEIGHTS_URL, FIDInceptionV3, sha256_file, weights_hash_notes

PROTOCOL = "adm-tf-inception-2015-12-05"
ADM_REF_BATCHES = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/"
POOL_KEY = "pool_3"  # optional cached pool_3 features in our statistics files


def protocol_info(*, fp16_distances: bool = True, batch_size: int = 64) -> dict[str, Any]:
    return {
        "name": PROTOCOL,
        "reference": "openai/guided-diffusion evaluations/evaluator.py",
        "network": f"FID Inception-v3 ({WEIGHTS_NAME})",
        "resize": "TF1 legacy bilinear to 299 (no half-pixel, no antialias), (x-128)/128",
        "fid": "pool_3 2048-d, np.cov ddof=1, float64",
        "sfid": "mixed_6/conv (Mixed_6d.branch1x1) first 7 channels, NHWC flatten, 2023-d",
        "is": f"softmax(pool_3 @ W) no bias, consecutive splits of {ADM_SPLIT_SIZE}",
        "precision_recall": f"k={ADM_K}, {ADM_BLOCK}x{ADM_BLOCK} blocks, "
                            + ("fp16 distances (ADM emulation)" if fp16_distances else "fp32 distances"),
        "batch_size": batch_size,
    }


@dataclass
class FeatureSet:
    """What one side of the comparison provides: statistics and (optionally) pool_3 features."""

    path: Path
    pool_stats: FeatureStats
    spatial_stats: FeatureStats
    pool: np.ndarray | None
    stats_from_file: bool = False
    num_images: int | None = None
    notes: list[str] = field(default_factory=list)


def _has_images(path: Path) -> bool:
    return path.is_dir() or "arr_0" in npz_keys(path)


def check_feature_input(path: str | os.PathLike[str], *, statistics_ok: bool = True, headers: bool = True) -> None:
    """Refuse, naming it, an input :func:`load_feature_set` could not use — checked before any network loads: a
    missing path, a file that is not an ``.npz``, an ``.npz`` with neither images (``arr_0``) nor the four
    statistics (when ``statistics_ok``), fewer than two images (a covariance needs two), and (``headers``) a
    folder's file that is no image or of another size."""
    p = Path(path)
    if not p.exists():
        where = (f" (ADM's reference batches are published under {ADM_REF_BATCHES}, e.g. imagenet/256/{p.name})"
                 if p.name.startswith("VIRTUAL_") else "")
        raise FileNotFoundError(f"no such image folder or npz file: {p}{where}")
    stats = " or mu/sigma/mu_s/sigma_s statistics" if statistics_ok else ""
    if not p.is_dir() and p.suffix != ".npz":
        raise ValueError(f"{p}: expected an image folder or an .npz holding arr_0 (uint8 (N, H, W, 3) images){stats}, "
                         "e.g. the samples_N.npz of `selfflow sample --out-dir`")
    if p.is_file() and statistics_ok and set(STAT_KEYS) <= set(npz_keys(p)):
        return
    if not _has_images(p):
        raise KeyError(f"{p}: neither images ('arr_0'){stats.replace(' or', ' nor')}; arrays: {npz_keys(p)}")
    images = open_images(p)
    if (n := len(images)) < 2:
        raise ValueError(f"{p}: {n} image{'' if n == 1 else 's'}; a Fréchet distance's covariance needs at least 2 "
                         "(ADM's reference batches hold 10,000 or 50,000)")
    if headers and isinstance(images, FolderImages):
        images.check_headers()


def load_feature_set(path: str | os.PathLike[str], model: FIDInceptionV3, *, need_pool: bool = True,
                     batch_size: int = 64, progress: bool = True) -> FeatureSet:
    """Statistics and pool features of an image folder, an ADM batch or a statistics file.

    Stored ``mu``/``sigma``/``mu_s``/``sigma_s`` take precedence over the images (ADM semantics);
    pool features come from a stored ``pool_3`` array, else from the images when ``need_pool``.
    """
    p = Path(path)
    check_feature_input(p, headers=False)  # a folder's headers: read by the callers' checks before any network
    stored = read_reference_stats(p) if p.suffix == ".npz" else None
    pool = None
    if p.suffix == ".npz" and POOL_KEY in npz_keys(p):
        with np.load(p) as z:
            pool = z[POOL_KEY].astype(np.float32)
    if stored is not None:
        fs = FeatureSet(
            p, FeatureStats.from_moments(stored["mu"], stored["sigma"], count=_opt_int(stored.get("count"))),
            FeatureStats.from_moments(stored["mu_s"], stored["sigma_s"], count=_opt_int(stored.get("count_s"))),
            pool, stats_from_file=True)
        fs.notes.append(f"{p.name}: using its stored mu/sigma/mu_s/sigma_s")
        if pool is None and need_pool and _has_images(p):
            acts = extract_activations(open_images(p), model, batch_size=batch_size, progress=progress)
            fs.pool, fs.num_images = acts.pool, len(acts)
        return fs
    acts = extract_activations(open_images(p), model, batch_size=batch_size, progress=progress)
    return FeatureSet(p, acts.pool_stats, acts.spatial_stats, acts.pool, num_images=len(acts))


def order_and_size_notes(ref: str | os.PathLike[str], samples: str | os.PathLike[str]) -> list[str]:
    """What makes the numbers not what the user meant though both inputs are valid: arguments in the wrong
    order (ADM's is REF SAMPLES: IS, precision and recall are not symmetric) and images of two resolutions
    (both are resized to 299, but a FID across resolutions is not comparable with published ones)."""
    notes = []
    has_stats = [Path(p).is_file() and set(STAT_KEYS) <= set(npz_keys(p)) for p in (ref, samples)]
    if has_stats == [False, True]:
        notes.append(f"the samples ({Path(samples).name}) hold stored statistics and the reference "
                     f"({Path(ref).name}) does not: the order is `eval adm REF SAMPLES`; if these are swapped, "
                     "IS, precision and recall describe the reference (FID and sFID are symmetric)")
    sizes = [image_size(p) for p in (ref, samples)]
    if None not in sizes and sizes[0] != sizes[1]:
        (rw, rh), (sw, sh) = sizes
        notes.append(f"the reference images are {rw}x{rh} and the samples {sw}x{sh}: both are resized to 299 for "
                     "Inception, but a FID across resolutions is not comparable with published numbers (ADM's "
                     "ImageNet 256 batch holds 256x256 images)")
    return notes


def check_stats_weights(path: Path, sha256: str | None) -> None:
    """A statistics file written by ``selfflow eval stats`` records its Inception weights: refuse to compare it
    with features of other weights (both sides must come from the same network)."""
    if sha256 is None or path.suffix != ".npz" or "inception_sha256" not in npz_keys(path):
        return
    with np.load(path) as z:
        stored = str(z["inception_sha256"])
    if stored and stored != sha256:
        raise ValueError(f"{path} holds statistics of Inception weights with sha256 {stored[:16]}…, but these "
                         f"weights are {sha256[:16]}…: recompute it with `selfflow eval stats` and these weights")


def _opt_int(x: Any) -> int | None:
    return None if x is None else int(x)


def _weights_record(model: FIDInceptionV3) -> list[dict[str, str]]:
    path = getattr(model, "weights_path", None)
    if path is None:
        return [{"name": WEIGHTS_NAME, "path": "<in-memory>", "url": WEIGHTS_URL}]
    return [{"name": Path(path).name, "path": str(Path(path).resolve()), "sha256": sha256_file(path),
             "url": WEIGHTS_URL}]


def evaluate_adm(ref: str | os.PathLike[str], samples: str | os.PathLike[str], model: FIDInceptionV3, *,
                 batch_size: int = 64, fp16_distances: bool = True, progress: bool = True) -> dict[str, Any]:
    """The five ADM numbers plus provenance. Keys: fid, sfid, is, precision, recall, protocol, weights…"""
    weights = _weights_record(model)
    for given in (ref, samples):  # both, before extracting either's features: that can take hours
        check_feature_input(given)
        if Path(given).is_file():
            check_stats_weights(Path(given), weights[0].get("sha256"))
    input_notes = order_and_size_notes(ref, samples)
    ref_set = load_feature_set(ref, model, batch_size=batch_size, progress=progress)
    smp_set = load_feature_set(samples, model, batch_size=batch_size, progress=progress)
    notes = input_notes + ref_set.notes + smp_set.notes
    if "sha256" in weights[0]:
        notes += weights_hash_notes(weights[0]["sha256"])
    fid, fid_notes = checked_distance("FID", smp_set.pool_stats, ref_set.pool_stats)
    sfid, sfid_notes = checked_distance("sFID", smp_set.spatial_stats, ref_set.spatial_stats)
    notes += fid_notes + sfid_notes
    isc = prec = rec = None
    if smp_set.pool is not None:
        isc = inception_score(pool_to_logits(smp_set.pool, model))
    else:
        notes.append("Inception Score skipped: no sample images or pool_3 features")
    few = [f"{name} {len(fs.pool)}" for name, fs in (("reference", ref_set), ("samples", smp_set))
           if fs.pool is not None and len(fs.pool) <= ADM_K]
    if few:  # the k-NN radii need more than k features a side: the other metrics stand (it failed them all)
        notes.append(f"precision/recall skipped: the k = {ADM_K} nearest-neighbour radii need more than {ADM_K} "
                     f"images a side ({', '.join(few)})")
    elif smp_set.pool is not None and ref_set.pool is not None:
        dev = model.fc.weight.device
        pr = precision_recall(torch.from_numpy(ref_set.pool).to(dev), torch.from_numpy(smp_set.pool).to(dev),
                              fp16=fp16_distances)
        prec, rec = pr.precision, pr.recall
    else:
        notes.append("precision/recall skipped: needs images or pool_3 features on both sides")
    return {
        "fid": fid, "sfid": sfid, "is": isc, "precision": prec, "recall": rec,
        "protocol": protocol_info(fp16_distances=fp16_distances, batch_size=batch_size),
        "weights": weights,
        "ref": str(ref_set.path), "samples": str(smp_set.path),
        "num_samples": None if smp_set.pool is None else len(smp_set.pool),
        "num_ref_images": None if ref_set.pool is None else len(ref_set.pool),
        "notes": notes,
    }


def format_adm(metrics: dict[str, Any]) -> str:
    """Print like the ADM evaluator: one ``Name: value`` line per metric."""
    names = [("Inception Score", "is"), ("FID", "fid"), ("sFID", "sfid"), ("Precision", "precision"),
             ("Recall", "recall")]
    return "\n".join(f"{label}: {metrics[key] if metrics[key] is not None else 'n/a'}" for label, key in names)


def compute_stats_file(src: str | os.PathLike[str] | ImageSource, model: FIDInceptionV3,
                       out: str | os.PathLike[str], *, keep_features: bool = False, batch_size: int = 64,
                       progress: bool = True) -> dict[str, Any]:
    """Write ADM-layout statistics (``mu``, ``sigma``, ``mu_s``, ``sigma_s``, counts) for a source.

    ``keep_features`` also stores the pool_3 features (``pool_3``, N×2048 float32) so the file can
    serve as a precision/recall reference without the images.
    """
    source = src if isinstance(src, ImageSource) else open_images(src)
    acts = extract_activations(source, model, batch_size=batch_size, progress=progress)
    arrays: dict[str, Any] = {**acts.pool_stats.npz_dict(), **acts.spatial_stats.npz_dict("_s")}
    if keep_features:
        arrays[POOL_KEY] = acts.pool.astype(np.float32)
    weights = _weights_record(model)
    arrays["protocol"] = np.asarray(PROTOCOL)
    arrays["inception_sha256"] = np.asarray(weights[0].get("sha256", ""))
    arrays["source"] = np.asarray(str(source.path))
    if rank() == 0:  # every rank took part in the extraction; one writes
        save_npz_atomic(out, arrays)
    return {"out": str(out), "count": len(acts), "protocol": PROTOCOL, "weights": weights,
            "keys": sorted(arrays)}

