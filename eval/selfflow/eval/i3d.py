"""The I3D detector of the StyleGAN-V FVD protocol (universome/stylegan-v,
``src/metrics/frechet_video_distance.py``).

The detector is NVIDIA/StyleGAN-V's TorchScript ``i3d_torchscript.pt`` (class ``src.i3dpt_jit.I3D``,
"a perfectly reproduced TorchScript version" of the tf-hub ``i3d-kinetics-400/1`` model). Its
signature is ``forward(x, rescale=False, resize=False, return_features=False)`` and StyleGAN-V calls
it on uint8 videos ``[B, 3, T, H, W]`` with ``rescale=True`` (``x/255·2−1`` inside),
``resize=True`` (to 224×224 inside) and ``return_features=True`` (the 400 Kinetics logits averaged
over time, before the softmax). We do exactly that and never reimplement the network, so the resize
and BatchNorm details are whatever the file contains (``print(torch.jit.load(p).code)`` shows them).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selfflow.core.checkpoint import unreadable_torch_file

from .extractor import extract

I3D_FILE = "i3d_torchscript.pt"
I3D_URL = "https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt?dl=1"
I3D_MIRROR = "https://huggingface.co/ByteDance/LatentSync-1.6 (auxiliary/i3d_torchscript.pt)"
I3D_KWARGS = {"rescale": True, "resize": True, "return_features": True}
I3D_DIM = 400
WEIGHTS_HELP = (f"StyleGAN-V's TorchScript I3D `{I3D_FILE}`, published at {I3D_URL} "
                f"(mirror: {I3D_MIRROR}); download it on a machine with network and pass its path")


def load_i3d(path: str | os.PathLike, device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    """``torch.jit.load`` the StyleGAN-V I3D from a local file (fp32, eval mode)."""
    file = Path(path)
    if file.is_dir():
        file = file / I3D_FILE
    if not file.is_file():
        raise FileNotFoundError(f"I3D detector not found: {file}. Expected {WEIGHTS_HELP}.")
    with warnings.catch_warnings():  # TorchScript is deprecated, but it is the published format
        warnings.simplefilter("ignore", FutureWarning)
        try:
            module = torch.jit.load(str(file), map_location=device)
        except Exception as e:  # truncated, or not a TorchScript archive
            raise unreadable_torch_file(file, e, "I3D detector (TorchScript)") from e
    return module.eval().float()


def to_bcthw_uint8(videos: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 videos (B, T, H, W, 3) or (B, 3, T, H, W) → (B, 3, T, H, W)."""
    x = torch.as_tensor(videos)
    if x.dtype != torch.uint8:
        raise TypeError(f"I3D expects uint8 videos in [0, 255] (it rescales inside), got {x.dtype}")
    if x.ndim != 5:
        raise ValueError(f"expected videos (B, T, H, W, 3) or (B, 3, T, H, W), got {tuple(x.shape)}")
    if x.shape[-1] == 3:  # (B, T, H, W, 3), also at T = 3; a (B, 3, T, H, W) batch is never 3 pixels wide
        x = x.permute(0, 4, 1, 2, 3)
    elif x.shape[1] != 3:
        raise ValueError(f"no channel dimension of size 3 in video batch {tuple(x.shape)}")
    return x.contiguous()


class I3DFeatures:
    """Batched I3D features (float64 numpy, (N, 400)) with StyleGAN-V's call arguments."""

    def __init__(self, detector: Any, batch_size: int = 8, device: str | torch.device = "cpu",
                 progress: bool = True) -> None:
        self.detector = detector
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.progress = progress

    @torch.no_grad()
    def features(self, clips: list[np.ndarray] | torch.Tensor | np.ndarray) -> np.ndarray:
        """(B, 400) float64 features of B uint8 clips of one shape, (T, H, W, 3) each."""
        x = to_bcthw_uint8(np.stack(clips) if isinstance(clips, list) else clips).to(self.device)
        feats = self.detector(x, **I3D_KWARGS)
        if feats.ndim != 2:
            raise ValueError(f"I3D returned shape {tuple(feats.shape)}, expected (B, D)")
        return feats.double().cpu().numpy()

    def __call__(self, clips: Iterable[np.ndarray], total: int | None = None,
                 desc: str = "I3D") -> np.ndarray:
        """Features of an iterable of (T, H, W, 3) uint8 clips; consecutive clips of the same shape
        are batched together."""
        return extract(self, clips, batch_size=self.batch_size, split_on_shape=True, total=total,
                       desc=desc, unit="clip", progress=self.progress)
