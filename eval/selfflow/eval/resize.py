"""TensorFlow-1.x ``ResizeBilinear`` (legacy mode) in PyTorch.

The ADM/TTUR FID graph resizes every image to 299×299 inside TensorFlow with ``align_corners=False``
and *without* half-pixel centres or antialiasing: output pixel ``i`` samples the input at
``i·(in/out)`` computed in float32, i.e. the image is anchored at its top-left corner. PyTorch's
``F.interpolate(mode="bilinear")`` uses half-pixel centres and gives different pixels (≈1 grey level
on average for 256→299), which shifts FID; this module reproduces the TF arithmetic step by step
(float32 source coordinates, lerp along x for the two source rows, then along y) so that CPU results
are bit-identical to the reference.
"""

from __future__ import annotations

import torch


def _source_coords(in_size: int, out_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # TF: scale = float(in) / out (float32); src = float(i) * scale; lo = floor(src);
    # hi = min(ceil(src), in-1); frac = src - lo. Using lo+1 for hi is equivalent: frac is 0 when ceil == lo.
    scale = torch.tensor(in_size / out_size, dtype=torch.float32, device=device)
    src = torch.arange(out_size, dtype=torch.float32, device=device) * scale
    lo = src.floor()
    frac = src - lo
    lo_i = lo.long().clamp_(0, in_size - 1)
    hi_i = (lo_i + 1).clamp_(max=in_size - 1)
    return lo_i, hi_i, frac


def resize_bilinear_tf1(images: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Resize float images (B, C, H, W) to ``size`` like TF1 ``tf.image.resize_bilinear``.

    ``align_corners=False``, no half-pixel centres, no antialiasing (also when downsampling).
    The interpolation weights are float32 (as in TF); the arithmetic runs in the input dtype.
    """
    if images.ndim != 4:
        raise ValueError(f"expected (B, C, H, W) images, got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"expected a floating point tensor, got {images.dtype}")
    out_h, out_w = (size, size) if isinstance(size, int) else size
    in_h, in_w = images.shape[-2:]
    y_lo, y_hi, dy = _source_coords(in_h, out_h, images.device)
    x_lo, x_hi, dx = _source_coords(in_w, out_w, images.device)
    dy = dy.to(images.dtype).view(1, 1, out_h, 1)
    dx = dx.to(images.dtype).view(1, 1, 1, out_w)

    def lerp_x(rows: torch.Tensor) -> torch.Tensor:
        left = rows.index_select(3, x_lo)
        right = rows.index_select(3, x_hi)
        return left + (right - left) * dx

    top = lerp_x(images.index_select(2, y_lo))
    bottom = lerp_x(images.index_select(2, y_hi))
    return top + (bottom - top) * dy
