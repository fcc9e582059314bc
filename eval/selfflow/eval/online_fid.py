"""Online FID during training (entry point ``inception_fid``): FID, sFID and Inception Score of a run's image
samples against reference statistics, computed as ``selfflow eval adm`` computes them for the same images.

Configure it in the run's ``eval`` section; the statistics file is an ADM reference batch (its ``mu``,
``sigma``, ``mu_s``, ``sigma_s``) or the output of ``selfflow eval stats``::

    eval:
      every: 50000
      num_samples: 10000          # FID-10k; generated in equal shares by every rank, scored on rank 0
      evaluators: [inception_fid]
      options:
        inception_fid: {reference: data/VIRTUAL_imagenet256_labeled.npz,
                        inception: checkpoints/pt_inception-2015-12-05-6726825d.pth}

The samples are quantised to uint8 exactly as ``selfflow sample`` writes them (``Modality.evaluation_array``).
FID from N samples is biased upwards for small N (the paper's numbers are FID-50k): compare online values with
each other, not with published ones.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from .adm_eval import check_stats_weights, load_feature_set
from .adm_metrics import inception_score
from .extract import extract_activations, pool_to_logits
from .frechet import checked_distance
from .image_io import ArrayImages, read_reference_stats
from .inception import load_inception, sha256_file, weights_hash_notes

logger = logging.getLogger("selfflow")


class InceptionFIDEvaluator:
    """``InceptionFIDEvaluator(modality, reference=…)(media, labels)`` → ``{"fid", "sfid", "is"}``.

    ``reference``: a ``.npz`` with ``mu``/``sigma``/``mu_s``/``sigma_s``; ``inception``: the FID Inception
    weights (default: ``$SELFFLOW_WEIGHTS``); ``batch_size``: Inception batch (ADM's 64); ``device``: where
    Inception runs (default: this rank's GPU, else the CPU). Everything is checked here, when the run starts,
    not at its first evaluation."""

    @staticmethod
    def scores(modality: Any) -> bool:
        """Images only: in a mixed run the trainer runs it on the image modalities."""
        from selfflow.image.modality import ImageModality

        return isinstance(modality, ImageModality)

    def __init__(self, modality: Any, reference: str | os.PathLike[str], inception: str | os.PathLike[str] | None = None,
                 batch_size: int = 64, device: str | None = None):
        if not self.scores(modality):
            raise ValueError(f"inception_fid scores images, but the {modality.name!r} modality is "
                             f"{type(modality).__name__}: run it on image modalities only")
        if batch_size < 1:
            raise ValueError(f"inception_fid batch_size must be ≥ 1, got {batch_size}")
        self.modality, self.batch_size = modality, batch_size
        self.device = None if device is None else torch.device(device)
        ref = Path(reference).expanduser()
        if ref.is_dir():  # reference images: their statistics are computed once, not at every evaluation
            raise ValueError(f"inception_fid reference {ref} is a folder: write its statistics once with "
                             f"`selfflow eval stats {ref} --out ref_stats.npz` and give that file")
        if not ref.is_file():
            raise FileNotFoundError(f"inception_fid reference statistics not found: {ref}")
        if ref.suffix != ".npz" or read_reference_stats(ref) is None:
            raise ValueError(f"{ref} holds no mu/sigma/mu_s/sigma_s statistics: write them from reference images "
                             f"with `selfflow eval stats IMAGES --out {ref.with_suffix('.npz').name}`")
        self.model = load_inception(inception)
        sha256 = sha256_file(self.model.weights_path)
        check_stats_weights(ref, sha256)
        weights_hash_notes(sha256)  # a UserWarning, once, when these are not the published weights
        self.reference = load_feature_set(ref, self.model, need_pool=False, progress=False)  # its statistics
        self._said: set[str] = set()

    @torch.no_grad()
    def __call__(self, media: torch.Tensor, labels: torch.Tensor | None) -> dict[str, float]:
        images = self.modality.evaluation_array(media)  # uint8 (N, H, W, 3), as `selfflow sample` writes them
        # The samples arrive in CPU memory; Inception runs on this rank's GPU when there is one.
        cuda = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        self.model.to(self.device or cuda or media.device)
        acts = extract_activations(ArrayImages(images), self.model, batch_size=self.batch_size, progress=False,
                                   shard=False)
        with warnings.catch_warnings():  # its notes are logged below instead: once each, into train.log too
            warnings.simplefilter("ignore", UserWarning)
            fid, notes = checked_distance("FID", acts.pool_stats, self.reference.pool_stats)
            sfid, spatial_notes = checked_distance("sFID", acts.spatial_stats, self.reference.spatial_stats)
        for note in notes + spatial_notes:
            if note not in self._said:  # the same small-N note at every evaluation is noise
                self._said.add(note)
                logger.warning("inception_fid: %s", note)
        return {"fid": fid, "sfid": sfid, "is": inception_score(pool_to_logits(acts.pool, self.model))}
