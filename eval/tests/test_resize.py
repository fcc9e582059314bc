from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

from selfflow.eval.resize import resize_bilinear_tf1


def _tf1_reference_numpy(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Independent float32 transcription of TF1 ResizeBilinear (legacy) for one (H, W) plane."""
    in_h, in_w = img.shape
    out = np.empty((out_h, out_w), np.float32)
    sy, sx = np.float32(in_h / out_h), np.float32(in_w / out_w)
    for y in range(out_h):
        fy = np.float32(y) * sy
        y0 = int(np.floor(fy))
        y1 = min(int(np.ceil(fy)), in_h - 1)
        dy = np.float32(fy - np.float32(y0))
        for x in range(out_w):
            fx = np.float32(x) * sx
            x0 = int(np.floor(fx))
            x1 = min(int(np.ceil(fx)), in_w - 1)
            dx = np.float32(fx - np.float32(x0))
            top = img[y0, x0] + (img[y0, x1] - img[y0, x0]) * dx
            bottom = img[y1, x0] + (img[y1, x1] - img[y1, x0]) * dx
            out[y, x] = top + (bottom - top) * dy
    return out


@pytest.mark.parametrize("h,w", [(32, 32), (64, 64), (256, 256), (299, 299), (512, 384), (37, 100)])
def test_resize_bit_exact_vs_torch_fidelity(h: int, w: int, make_images) -> None:
    x = torch.from_numpy(make_images(2, h, w, seed=h + w)).permute(0, 3, 1, 2).float()
    ours = resize_bilinear_tf1(x, 299)
    ref = interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
    assert ours.shape == (2, 3, 299, 299)
    assert torch.equal(ours, ref)


def test_resize_matches_tf1_transcription_and_not_half_pixel(make_images) -> None:
    x = torch.from_numpy(make_images(1, 23, 17, seed=3)).permute(0, 3, 1, 2).float()
    ours = resize_bilinear_tf1(x, (41, 29))
    ref = _tf1_reference_numpy(x[0, 0].numpy(), 41, 29)
    np.testing.assert_array_equal(ours[0, 0].numpy(), ref)
    # PyTorch's half-pixel bilinear is a different resize: make sure we are not computing it
    torch_bilinear = F.interpolate(x, size=(41, 29), mode="bilinear", align_corners=False)
    assert (ours - torch_bilinear).abs().max() > 1.0


def test_resize_identity_and_validation() -> None:
    x = torch.rand(1, 3, 299, 299) * 255
    assert torch.equal(resize_bilinear_tf1(x, 299), x)
    with pytest.raises(TypeError, match="floating"):
        resize_bilinear_tf1(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), 8)
    with pytest.raises(ValueError, match="B, C, H, W"):
        resize_bilinear_tf1(torch.zeros(3, 4, 4), 8)
