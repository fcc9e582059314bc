"""REPA at toy scale: a small CNN trained beforehand on the training split of a built-in dataset, frozen,
whose per-patch features are the REPA target (``data.options.repa_encoder: toy``).

It stands in for DINOv2 where no pretrained encoder exists (synthetic shapes, digits). The network is a
class-supervised CNN: conv stages with 2× max-pooling until the feature map has the size of the token grid,
then a 3×3 conv to ``dim`` channels, one feature vector per token (row-major, the order of
:func:`selfflow.core.tokens.grid_ids`); its classification head (global average → linear) only trains it.
``dim`` defaults to 128, the tiny MMDiT's width, which its REPA projector maps to.

Training is deterministic (seed, fixed batches of the dataset's training stream) and cached under
``$SELFFLOW_CACHE`` (default ``~/.cache/selfflow``) as ``toy_repa_<hash>.pt``, the hash of everything that
changes the weights (version, dataset, image size, grid, classes, width, data seed, steps, batch, seed). It is a different network
(its own seed, its own stream) from the evaluation probe of ``selfflow.eval``, but still trained on the same
labels: its features and the probe's are correlated, which favours REPA on probe-FD (see the bench notes).
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from selfflow.core.cached_training import cache_file, cached_classifier

TOY_ENCODER_VERSION = 2  # 2: seeded initialisation
TRAIN_STEPS, TRAIN_BATCH, TRAIN_SEED = 400, 128, 1  # its own seed: not the evaluation probe's initialisation


class ToyEncoderNet(nn.Module):
    """``(B, 3, S, S)`` → features ``(B, dim, g, g)`` with ``g = grid``; ``head`` classifies their mean."""

    def __init__(self, image_size: int, grid: int, num_classes: int, dim: int = 128, width: int = 32):
        super().__init__()
        if image_size % grid or (image_size // grid) & (image_size // grid - 1):
            raise ValueError(f"the toy REPA encoder needs image_size / token grid to be a power of two, got "
                             f"{image_size} / {grid}")
        layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1), nn.ReLU()]
        res, w = image_size, width
        while res > grid:
            layers += [nn.MaxPool2d(2), nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU()]
            res, w = res // 2, 2 * w
        layers.append(nn.Conv2d(w, dim, 3, padding=1))
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images)


class ToyRepaEncoder:
    """The REPA target of a built-in dataset: ``(B, 3, S, S)`` in [-1, 1] → ``(B, grid², dim)``."""

    def __init__(self, dataset: str, image_size: int, grid: int, num_classes: int, data_seed: int = 0,
                 dim: int = 128, device: torch.device | str = "cpu"):
        if dataset == "synthetic_shapes":
            from .synthetic_shapes import render_batch

            def batches(indices: range) -> tuple[torch.Tensor, torch.Tensor]:
                return render_batch(data_seed, indices, image_size)
        elif dataset == "digits":
            from .digits import digits_batch

            def batches(indices: range) -> tuple[torch.Tensor, torch.Tensor]:
                return digits_batch(data_seed, indices, image_size)
        else:
            raise ValueError(f"repa_encoder: toy needs a built-in dataset (synthetic_shapes or digits), "
                             f"got {dataset!r}")
        steps, batch, seed = TRAIN_STEPS, TRAIN_BATCH, TRAIN_SEED
        key = (f"v{TOY_ENCODER_VERSION}-{dataset}-{image_size}-{grid}-{num_classes}-{dim}-{data_seed}-"
               f"{steps}-{batch}-{seed}")
        net = cached_classifier(lambda: ToyEncoderNet(image_size, grid, num_classes, dim), cache_file("toy_repa", key),
                                lambda n, images: n.head(n(images).mean((2, 3))), batches, steps, batch, seed)
        self.net = net.requires_grad_(False).to(device)
        self.dim = dim

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        device = next(self.net.parameters()).device
        feats = self.net(images.float().to(device))  # (B, dim, g, g)
        return rearrange(feats, "b d h w -> b (h w) d")  # row-major like grid_ids
