"""Image files above PIL's decompression-bomb bound are a clear error, not a warning and a 430 MB decode."""

import io
import warnings

import numpy as np
import pytest
from PIL import Image

from selfflow.core.data.image_file import decode_rgb, read_rgb


def test_reads_rgb_like_pil(tmp_path):
    arr = np.random.default_rng(0).integers(0, 255, (5, 7), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "grey.png")
    img = read_rgb(tmp_path / "grey.png")
    assert img.mode == "RGB" and np.array_equal(np.asarray(img)[..., 1], arr)


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    arr = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    assert np.asarray(read_rgb(tmp_path / "grey16.png"))[0, :, 0].tolist() == [0, 1, 128, 255]


@pytest.mark.parametrize("side", [12000, 20000])  # PIL warns only (12000²) / raises itself (20000²)
def test_over_large_image_is_an_error_naming_the_file(tmp_path, side):
    path = tmp_path / "huge.png"
    Image.new("1", (side, side)).save(path)  # 1-bit: a few MB to create, tens of KB on disk
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no warning escapes
        with pytest.raises(ValueError, match=rf"image .*huge\.png is too large to decode: Image size \({side**2}"):
            read_rgb(path)


def test_decoding_bytes_has_the_same_bound_and_names_the_image(monkeypatch):
    buf = io.BytesIO()
    Image.new("L", (10, 10)).save(buf, format="png")  # 100 px: above the lowered bound, below twice it
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=r"image shard-3/key7\.png is too large to decode: Image size \(100 pixels"):
            decode_rgb(buf.getvalue(), "shard-3/key7.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    assert decode_rgb(buf.getvalue(), "x").size == (10, 10)


def test_corrupt_file_raises(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    with pytest.raises(OSError):
        read_rgb(tmp_path / "bad.jpg")
