from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from selfflow.eval.extract import shard_range
from selfflow.eval.image_io import FolderImages, NpzImages, open_images, read_reference_stats


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_streaming_batches_and_ranges(tmp_path: Path, compressed: bool, make_images) -> None:
    imgs = make_images(11, 8, 6, seed=1)
    path = tmp_path / "batch.npz"
    (np.savez_compressed if compressed else np.savez)(path, arr_0=imgs, arr_1=np.arange(11))
    src = open_images(path)
    assert isinstance(src, NpzImages) and len(src) == 11
    batches = list(src.batches(4))
    assert [len(b) for b in batches] == [4, 4, 3]
    np.testing.assert_array_equal(np.concatenate(batches), imgs)
    part = np.concatenate(list(src.batches(2, start=5, stop=10)))
    np.testing.assert_array_equal(part, imgs[5:10])


def test_npz_validation(tmp_path: Path) -> None:
    np.savez(tmp_path / "f.npz", arr_0=np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        NpzImages(tmp_path / "f.npz")
    np.savez(tmp_path / "nhwc.npz", arr_0=np.zeros((2, 3, 4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        NpzImages(tmp_path / "nhwc.npz")
    np.savez(tmp_path / "k.npz", images=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(KeyError, match="arr_0"):
        NpzImages(tmp_path / "k.npz")
    with pytest.raises(FileNotFoundError):
        open_images(tmp_path / "missing.npz")


def test_folder_png_jpeg_sorted_rgb(tmp_path: Path, make_images) -> None:
    imgs = make_images(5, 10, 12, seed=2)
    (tmp_path / "sub").mkdir()
    for i, im in enumerate(imgs):
        folder = tmp_path / "sub" if i % 2 else tmp_path
        Image.fromarray(im).save(folder / f"{i:03d}.png")
    Image.fromarray(imgs[0]).convert("L").save(tmp_path / "gray.png")  # converted to RGB
    (tmp_path / "notes.txt").write_text("ignored")
    src = open_images(tmp_path)
    assert isinstance(src, FolderImages) and len(src) == 6
    out = np.concatenate(list(src.batches(4)))
    assert out.shape == (6, 10, 12, 3) and out.dtype == np.uint8
    # order: sorted relative paths → 000, 002, 004, gray, sub/001, sub/003
    np.testing.assert_array_equal(out[[0, 1, 2, 4, 5]], imgs[[0, 2, 4, 1, 3]])
    assert (out[3, ..., 0] == out[3, ..., 1]).all()


def test_folder_mixed_sizes_error_names_file(tmp_path: Path, make_images) -> None:
    Image.fromarray(make_images(1, 8, 8)[0]).save(tmp_path / "a.png")
    Image.fromarray(make_images(1, 9, 8)[0]).save(tmp_path / "b.jpg")
    with pytest.raises(ValueError, match=r"b\.jpg"):
        list(open_images(tmp_path).batches(2))
    # the rule holds across batch boundaries: 8, 8 | 9, 9 is as mixed as 8 | 9
    Image.fromarray(make_images(1, 8, 8)[0]).save(tmp_path / "a2.png")
    Image.fromarray(make_images(1, 9, 8)[0]).save(tmp_path / "b2.jpg")
    with pytest.raises(ValueError, match=r"b\.jpg is 8x9, .*a\.png is 8x8"):
        list(open_images(tmp_path).batches(2))
    with pytest.raises(ValueError, match=r"b2?\.jpg is 8x9, .*a\.png is 8x8"):
        list(open_images(tmp_path).batches(1, start=2))  # a rank's range starting past the first image
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        FolderImages(tmp_path / "empty")


def test_reference_stats_keys(tmp_path: Path) -> None:
    np.savez(tmp_path / "ref.npz", arr_0=np.zeros((1, 2, 2, 3), np.uint8), mu=np.zeros(3), sigma=np.eye(3),
             mu_s=np.ones(2), sigma_s=np.eye(2))
    stats = read_reference_stats(tmp_path / "ref.npz")
    assert stats is not None and set(stats) == {"mu", "sigma", "mu_s", "sigma_s"}
    np.savez(tmp_path / "partial.npz", mu=np.zeros(3), sigma=np.eye(3))
    assert read_reference_stats(tmp_path / "partial.npz") is None


def test_shard_range_covers_everything_once() -> None:
    for n in (0, 1, 7, 64):
        for world in (1, 2, 3, 8):
            parts = [shard_range(n, r, world) for r in range(world)]
            covered = [i for a, b in parts for i in range(a, b)]
            assert covered == list(range(n))
            assert max(b - a for a, b in parts) - min(b - a for a, b in parts) <= 1
