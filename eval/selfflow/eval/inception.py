"""The FID Inception-v3: the TensorFlow graph of 2015-12-05 (used by TTUR/ADM) as a PyTorch module.

It is torchvision's Inception-v3 layout with the quirks of that graph (facts documented by
pytorch-fid PR #16 and torch-fidelity): BatchNorm eps 1e-3; the average-pool branches exclude the
zero padding from the average (``count_include_pad=False``); the last block (``Mixed_7c``) pools its
pool branch with a **max** pool; 1008 output classes. Weights: the standard converted state_dict
``pt_inception-2015-12-05-6726825d.pth`` (torchvision key names, no ``AuxLogits``).

Outputs follow the ADM evaluator (openai/guided-diffusion ``evaluations/evaluator.py``):

- ``pool``: ``pool_3:0``, 2048-d (FID, precision/recall, IS input);
- ``spatial``: ``mixed_6/conv:0[..., :7]`` — the post-ReLU output of ``Mixed_6d.branch1x1``
  (17×17×192), first 7 channels, flattened in TF's NHWC order → 17·17·7 = 2023-d (sFID);
- ``logits``: ``pool @ W`` with the 1008×2048 softmax weights and **no bias** (IS).

Input pipeline as in the graph: uint8 → float → TF1 legacy bilinear resize to 299 → (x − 128)/128.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from selfflow.core.checkpoint import unreadable_torch_file

from .frechet import MetricNote
from .resize import resize_bilinear_tf1

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_NAME
# The same tensors published by torch-fidelity under another name.
ALT_WEIGHTS_NAMES = ("weights-inception-2015-12-05-6726825d.pth",)
# Both release names end in the first 8 hex digits of the file's SHA-256 (the torch.hub convention).
PUBLISHED_SHA256_PREFIX = "6726825d"
WEIGHTS_ENV = "SELFFLOW_WEIGHTS"
INPUT_SIZE = 299
SPATIAL_CHANNELS = 7


class ConvBN(nn.Module):
    """Conv (no bias) → BatchNorm(eps=1e-3) → ReLU; attribute names match the checkpoint."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _pool3x3_same(x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "max":
        return F.max_pool2d(x, 3, stride=1, padding=1)
    # TF's SAME average pool divides by the number of *valid* inputs under the window.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def _chain(x: torch.Tensor, layers: Sequence[nn.Module]) -> torch.Tensor:
    for layer in layers:
        x = layer(x)
    return x


class BlockA(nn.Module):  # Mixed_5b/c/d (35×35)
    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = ConvBN(cin, 64, 1)
        self.branch5x5_1 = ConvBN(cin, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch1x1(x),
            _chain(x, [self.branch5x5_1, self.branch5x5_2]),
            _chain(x, [self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3]),
            self.branch_pool(_pool3x3_same(x, "avg")),
        ], 1)


class BlockB(nn.Module):  # Mixed_6a (35→17)
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch3x3(x),
            _chain(x, [self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3]),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class BlockC(nn.Module):  # Mixed_6b..6e (17×17, factorised 7×7)
    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        self.branch1x1 = ConvBN(cin, 192, 1)
        self.branch7x7_1 = ConvBN(cin, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward_with_1x1(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Block output and the ``branch1x1`` activation (TF ``mixed_N/conv``)."""
        b1 = self.branch1x1(x)
        out = torch.cat([
            b1,
            _chain(x, [self.branch7x7_1, self.branch7x7_2, self.branch7x7_3]),
            _chain(x, [self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                       self.branch7x7dbl_4, self.branch7x7dbl_5]),
            self.branch_pool(_pool3x3_same(x, "avg")),
        ], 1)
        return out, b1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_1x1(x)[0]


class BlockD(nn.Module):  # Mixed_7a (17→8)
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = ConvBN(cin, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            _chain(x, [self.branch3x3_1, self.branch3x3_2]),
            _chain(x, [self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4]),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class BlockE(nn.Module):  # Mixed_7b (avg pool) / Mixed_7c (max pool: a quirk of the TF graph)
    def __init__(self, cin: int, pool: str) -> None:
        super().__init__()
        self.pool = pool
        self.branch1x1 = ConvBN(cin, 320, 1)
        self.branch3x3_1 = ConvBN(cin, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(a), self.branch3x3_2b(a),
            self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b),
            self.branch_pool(_pool3x3_same(x, self.pool)),
        ], 1)


@dataclass
class InceptionFeatures:
    """Per-image features; any field is None when it was not requested."""

    pool: torch.Tensor | None  # (B, 2048)
    spatial: torch.Tensor | None  # (B, 2023)
    logits: torch.Tensor | None  # (B, 1008), no bias


def to_nchw_uint8(images: torch.Tensor) -> torch.Tensor:
    """Accept uint8 (B, 3, H, W) or (B, H, W, 3); return (B, 3, H, W)."""
    if images.dtype != torch.uint8:
        raise TypeError(f"Inception expects uint8 images in [0, 255], got {images.dtype} "
                        "(quantise first: clamp(127.5·x + 128, 0, 255).to(torch.uint8))")
    if images.ndim != 4:
        raise ValueError(f"expected a batch (B, 3, H, W) or (B, H, W, 3), got shape {tuple(images.shape)}")
    channels_first, channels_last = images.shape[1] == 3, images.shape[-1] == 3
    if channels_last and not channels_first:
        return images.permute(0, 3, 1, 2)
    if channels_first:  # also the ambiguous (B, 3, H, 3) case: NCHW, the PyTorch convention
        return images
    raise ValueError(f"expected 3 colour channels in dim 1 or 3, got shape {tuple(images.shape)}")


class FIDInceptionV3(nn.Module):
    """Inception-v3 of the 2015-12-05 TF graph. Call on uint8 images; see the module docstring."""

    weights_path: Path | None = None  # set by load_inception (recorded in metric outputs)

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = BlockA(192, 32)
        self.Mixed_5c = BlockA(256, 64)
        self.Mixed_5d = BlockA(288, 64)
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b = BlockC(768, 128)
        self.Mixed_6c = BlockC(768, 160)
        self.Mixed_6d = BlockC(768, 160)
        self.Mixed_6e = BlockC(768, 192)
        self.Mixed_7a = BlockD(768)
        self.Mixed_7b = BlockE(1280, pool="avg")
        self.Mixed_7c = BlockE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)
        self.eval()
        self.requires_grad_(False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 → float → TF1 bilinear 299×299 → (x − 128)/128, in the parameters' dtype."""
        x = to_nchw_uint8(images).to(device=self.fc.weight.device, dtype=self.fc.weight.dtype)
        x = resize_bilinear_tf1(x, INPUT_SIZE)
        return (x - 128) / 128

    def forward(self, images: torch.Tensor, *, spatial: bool = True, logits: bool = True) -> InceptionFeatures:
        x = self.preprocess(images)
        x = _chain(x, [self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3])
        x = F.max_pool2d(x, 3, stride=2)
        x = _chain(x, [self.Conv2d_3b_1x1, self.Conv2d_4a_3x3])
        x = F.max_pool2d(x, 3, stride=2)
        x = _chain(x, [self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                       self.Mixed_6c])
        x, conv = self.Mixed_6d.forward_with_1x1(x)
        spatial_feats = None
        if spatial:  # NCHW → NHWC, keep 7 channels, flatten as TF would
            spatial_feats = conv[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(conv.shape[0], -1).float()
        x = _chain(x, [self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c])
        pool = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        logit_feats = pool.mm(self.fc.weight.T).float() if logits else None
        return InceptionFeatures(pool=pool.float(), spatial=spatial_feats, logits=logit_feats)

    @property
    def softmax_weight(self) -> torch.Tensor:
        """(1008, 2048) matrix W of ``softmax/logits/MatMul``; logits = pool @ Wᵀ (no bias)."""
        return self.fc.weight


def resolve_weights(path: str | os.PathLike[str] | None = None) -> Path:
    """An explicit file, else ``$SELFFLOW_WEIGHTS/pt_inception-2015-12-05-6726825d.pth``."""
    hint = (f"Download {WEIGHTS_NAME} from {WEIGHTS_URL} and pass its path (--inception PATH) "
            f"or put it in the directory named by ${WEIGHTS_ENV}.")
    if path is not None:
        p = Path(path).expanduser()
        if p.is_dir():
            p = p / WEIGHTS_NAME
        if not p.is_file():
            raise FileNotFoundError(f"Inception weights not found: {p}. {hint}")
        return p
    root = os.environ.get(WEIGHTS_ENV)
    if root:
        for name in (WEIGHTS_NAME, *ALT_WEIGHTS_NAMES):
            if (Path(root) / name).is_file():
                return Path(root) / name
        raise FileNotFoundError(f"Inception weights not found: {Path(root) / WEIGHTS_NAME}. {hint}")
    raise FileNotFoundError(f"Inception weights {WEIGHTS_NAME} not given and ${WEIGHTS_ENV} is not set. {hint}")


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_hash_notes(sha256: str) -> list[str]:
    """A warning line (also a ``UserWarning``) when ``sha256`` is not the published weights' hash."""
    if sha256.startswith(PUBLISHED_SHA256_PREFIX):
        return []
    note = (f"Inception weights sha256 {sha256[:16]}… is not the published "
            f"{PUBLISHED_SHA256_PREFIX}… of {WEIGHTS_NAME}: the metrics are not comparable to ADM's")
    warnings.warn(note, MetricNote, stacklevel=2)
    return [note]


def load_inception(path: str | os.PathLike[str] | None = None, *, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32) -> FIDInceptionV3:
    """Build :class:`FIDInceptionV3` and load the state_dict strictly from a local file."""
    file = resolve_weights(path)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, another format, pickled code
        raise unreadable_torch_file(file, e, "Inception weights") from e
    if not isinstance(state, dict):
        raise ValueError(f"{file}: expected a state_dict, got {type(state).__name__}")
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    model = FIDInceptionV3()
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"{file} is not the FID Inception state_dict: missing keys {missing[:5]}, "
                         f"unexpected keys {unexpected[:5]}")
    model.weights_path = file
    return model.to(device=device, dtype=dtype)

