"""FD-DINOv2 with the dgm-eval protocol (layer6ai-labs/dgm-eval, "Exposing flaws of generative model
evaluation metrics").

Protocol, as the published numbers compute it:

* network: DINOv2 ViT-L/14 (LVD-142M, no registers); feature = CLS token after the final LayerNorm
  (``x_norm_clstoken``, 1024-d);
* input: each image squashed (not cropped) to 224×224 with PIL bicubic on uint8 (antialiased and
  re-quantised to uint8), then /255 and ImageNet mean/std;
* position embeddings: trained on a 37×37 grid (518 px); at 224 px the official model resamples them
  bicubically with ``scale_factor = (16 + 0.1) / 37`` (the "interpolate_offset" kludge) and
  ``antialias=False``. Hugging Face's ``Dinov2Model`` resamples to ``size=(16, 16)`` instead, which is
  numerically different, so we replace that method on the loaded instance;
* statistics: float64 mean and unbiased covariance (``np.cov``), Fréchet distance.

Weights: a Hugging Face ``Dinov2Model`` directory (``facebook/dinov2-large``, converted by Hugging Face
from the official ``dinov2_vitl14_pretrain.pth``) loaded from a local path, never downloaded.
"""

from __future__ import annotations

import math
import os
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .extractor import extract
from .frechet import FeatureStats, checked_distance, save_npz_atomic
from .image_io import ImageInput, iter_images
from .reference_source import check_source, source_record

PROTOCOL = ("dgm-eval FD-DINOv2: ViT-L/14 CLS token after final LayerNorm; PIL bicubic 224x224 "
            "squash on uint8; ImageNet mean/std; pos-embed bicubic scale_factor (16+0.1)/37, "
            "antialias=False; float64 mean and unbiased covariance")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINOV2_SIZE = 224
INTERPOLATE_OFFSET = 0.1
WEIGHTS_HELP = ("a Hugging Face Dinov2Model directory (config.json + model.safetensors), e.g. "
                "`hf download facebook/dinov2-large --local-dir DIR` on a machine with "
                "network (https://huggingface.co/facebook/dinov2-large, the conversion of "
                "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth)")


# ----------------------------------------------------------------------------------------------
# preprocessing and model


def dgm_eval_preprocess(images: Sequence[np.ndarray], size: int = DINOV2_SIZE) -> torch.Tensor:
    """dgm-eval's transform: PIL bicubic resize of the uint8 image to (size, size) (squash, no
    crop; PIL antialiases and the result is re-quantised to uint8), then /255 and ImageNet
    mean/std. Returns float32 (N, 3, size, size)."""
    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for i, img in enumerate(images):
        pil = Image.fromarray(np.ascontiguousarray(img), mode="RGB")
        out[i] = np.asarray(pil.resize((size, size), Image.Resampling.BICUBIC))
    x = torch.from_numpy(out).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def official_pos_embed(pos_embed: torch.Tensor, rows: int, cols: int,
                       offset: float = INTERPOLATE_OFFSET) -> torch.Tensor:
    """Resample DINOv2 position embeddings (1, 1 + M*M, D) to a rows×cols patch grid exactly as
    ``dinov2/models/vision_transformer.py`` does for the hub models: bicubic in float32,
    ``scale_factor=((rows + offset) / M, (cols + offset) / M)``, ``antialias=False``; the CLS
    embedding is kept. Unchanged when the grid already matches."""
    n = pos_embed.shape[1] - 1
    m = math.isqrt(n)
    if m * m != n:
        raise ValueError(f"position embeddings of {n} patches are not a square grid")
    if rows == m and cols == m:
        return pos_embed
    dtype = pos_embed.dtype
    pos = pos_embed.float()
    dim = pos.shape[-1]
    grid = pos[:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((rows + offset) / m, (cols + offset) / m),
                         mode="bicubic", antialias=False)
    if tuple(grid.shape[-2:]) != (rows, cols):
        raise RuntimeError(f"pos-embed resample gave {tuple(grid.shape[-2:])}, want {(rows, cols)}")
    grid = grid.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)
    return torch.cat([pos[:, :1], grid], dim=1).to(dtype)


def use_official_pos_embed(model: Any) -> Any:
    """Make a Hugging Face ``Dinov2Model`` instance resample its position embeddings like the
    official hub model (see :func:`official_pos_embed`). Only this instance is changed."""
    emb = model.embeddings

    def interpolate_pos_encoding(self: Any, embeddings: torch.Tensor, height: int,
                                 width: int) -> torch.Tensor:
        ph, pw = self.patch_embeddings.patch_size if isinstance(
            self.patch_embeddings.patch_size, (tuple, list)) else (self.patch_size,) * 2
        return official_pos_embed(self.position_embeddings, height // ph, width // pw)

    emb.interpolate_pos_encoding = types.MethodType(interpolate_pos_encoding, emb)
    return model


def load_dinov2(path: str | os.PathLike) -> Any:
    """Load a Hugging Face ``Dinov2Model`` from a local directory (fp32, eval mode) with the
    official position-embedding resampling. A missing directory is a clear error."""
    root = Path(path)
    if not (root / "config.json").is_file():
        raise FileNotFoundError(f"DINOv2 weights not found: {root / 'config.json'} is missing. "
                                f"Expected {WEIGHTS_HELP}.")
    from transformers import Dinov2Model

    model = Dinov2Model.from_pretrained(str(root), local_files_only=True).float()
    return use_official_pos_embed(model.eval())


class DinoV2Features:
    """Batched DINOv2 CLS features (float64 numpy) under the dgm-eval protocol."""

    def __init__(self, model: Any, batch_size: int = 50, device: str | torch.device = "cpu",
                 progress: bool = True) -> None:
        self.model = model.eval().to(device=device, dtype=torch.float32)
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.progress = progress

    @torch.no_grad()
    def features(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """(B, 1024) float64 CLS features of uint8 (H, W, 3) images of any sizes."""
        x = dgm_eval_preprocess(images).to(self.device)
        out = self.model(pixel_values=x)
        # pooler_output = last_hidden_state[:, 0] after the final LayerNorm = x_norm_clstoken
        return out.pooler_output.double().cpu().numpy()

    def __call__(self, source: ImageInput, desc: str = "DINOv2") -> np.ndarray:
        images, total = iter_images(source)
        return extract(self, images, batch_size=self.batch_size, total=total, desc=desc, unit="img",
                       progress=self.progress)


def _stats_of(source: ImageInput, extractor: DinoV2Features, desc: str) -> FeatureStats:
    if isinstance(source, (str, os.PathLike)) and Path(source).suffix == ".npz":
        return FeatureStats.load(source)
    stats = FeatureStats()
    stats.update(extractor(source, desc=desc))
    return stats


def fd_dinov2(fake: ImageInput, real: ImageInput, model: Any | str | os.PathLike, *,
              batch_size: int = 50, device: str = "cpu", progress: bool = True,
              save_real_stats: str | os.PathLike | None = None) -> dict[str, Any]:
    """FD-DINOv2 between generated and reference images. ``fake``/``real``: a folder, a uint8
    (N, H, W, 3) array, a list of images, or (``real`` only, typically) a ``.npz`` saved by
    ``FeatureStats.save``. ``model``: a loaded Dinov2Model or its local directory."""
    weights = str(model) if isinstance(model, (str, os.PathLike)) else getattr(
        model.config, "_name_or_path", "in-memory model")
    weights_path = model if isinstance(model, (str, os.PathLike)) else None
    if isinstance(real, (str, os.PathLike)) and Path(real).suffix == ".npz":  # before the network loads
        check_source(real, "dinov2", weights_path)
    if isinstance(model, (str, os.PathLike)):
        model = load_dinov2(model)
    extractor = DinoV2Features(model, batch_size=batch_size, device=device, progress=progress)
    s_real = _stats_of(real, extractor, "DINOv2 real")
    if save_real_stats is not None:  # with the network and weights it came from, checked when read back
        save_npz_atomic(save_real_stats, {**s_real.npz_dict(), **source_record("dinov2", weights_path)})
    s_fake = _stats_of(fake, extractor, "DINOv2 fake")
    fd, notes = checked_distance("FD-DINOv2", s_fake, s_real)
    return {"fd_dinov2": float(fd), "protocol": PROTOCOL, "weights": weights,
            "n_fake": int(s_fake.count), "n_real": int(s_real.count), "notes": notes}
