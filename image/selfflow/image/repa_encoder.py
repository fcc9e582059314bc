"""REPA's frozen target encoder: DINOv2 (``transformers``, a local directory), per-patch features.

Images in [-1, 1] → [0, 1] → bicubic resize to ``resolution`` (224 for 256-px ImageNet: 16×16 patches of
14 px = 256 tokens, one per DiT token) → ImageNet mean/std → the final-LayerNorm patch tokens
(``x_norm_patchtokens``; the CLS and any register tokens are dropped), ``(B, N, D)``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class RepaEncoder:
    def __init__(self, path: str | Path, resolution: int = 224, device: torch.device | str = "cpu"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no DINOv2 model at {path} (config.json missing): download "
                                    f"facebook/dinov2-base with `hf download facebook/dinov2-base "
                                    f"--local-dir {path}` on a machine with network access")
        from transformers import AutoModel

        self.model = AutoModel.from_pretrained(str(path), local_files_only=True).to(device).eval()
        self.model.requires_grad_(False)
        self.resolution = resolution
        self.skip = 1 + int(getattr(self.model.config, "num_register_tokens", 0) or 0)
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def num_tokens(self) -> int:
        return (self.resolution // int(self.model.config.patch_size)) ** 2

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float().to(self.mean.device) + 1) / 2
        x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bicubic", align_corners=False)
        x = (x - self.mean) / self.std
        hidden = self.model(pixel_values=x).last_hidden_state  # final LayerNorm applied
        return hidden[:, self.skip:]
