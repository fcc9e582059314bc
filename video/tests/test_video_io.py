import itertools

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from selfflow.video import video_io
from selfflow.video.clips import ClipSpec, clip_indices, resize_crop, sample_clip
from selfflow.video.video_io import count_frames, read_frames, resolve_backend, video_fps, write_gif

from .conftest import moving_bar_video


def test_decord_and_pyav_give_the_same_frames(tmp_path):
    path = moving_bar_video(tmp_path / "bar.mp4")
    assert video_io.has_decord()  # decord 0.6 installs on this platform (x86_64)
    idx = [0, 3, 4, 8, 20]  # 20 is past the end: clamped to the last frame
    a = read_frames(path, idx, "decord")
    b = read_frames(path, idx, "pyav")
    assert a.shape == (5, 64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and np.array_equal(a[-1], a[-2])
    assert count_frames(path, "decord") == count_frames(path, "pyav") == 9
    # the bar is where it was drawn (lossy codec: compare the bright columns)
    assert abs(int(np.argmax(b[1, 32, :, 0])) - 12) <= 1


def test_pyav_takes_over_without_decord(tmp_path, monkeypatch):
    path = moving_bar_video(tmp_path / "bar.mp4")
    expected = read_frames(path, [1, 2], "pyav")
    assert resolve_backend("auto") == "decord"
    monkeypatch.setattr(video_io, "has_decord", lambda: False)
    assert resolve_backend("auto") == "pyav"
    assert np.array_equal(read_frames(path, [1, 2]), expected)
    with pytest.raises(ImportError, match="decord"):
        read_frames(path, [0], "decord")


def test_clip_spec_and_sampling(tmp_path):
    assert ClipSpec().frames == 45 and (ClipSpec().height, ClipSpec().width) == (192, 320)
    with pytest.raises(ValidationError, match="4k\\+1"):
        ClipSpec(frames=46)
    with pytest.raises(ValidationError, match="multiples of 32"):
        ClipSpec(width=336)
    rng = np.random.default_rng(0)
    idx = clip_indices(100, 5, 2, rng)
    assert idx == list(range(idx[0], idx[0] + 10, 2)) and idx[-1] < 100
    assert clip_indices(3, 5, 1, rng) == [0, 1, 2, 3, 4]
    frames = np.zeros((2, 40, 80, 3), dtype=np.uint8)
    frames[:, :, 40:] = 255  # right half white
    x = resize_crop(frames, 32, 32)  # scale to 32×64, keep the centre: left half black, right white
    assert x.shape == (3, 2, 32, 32) and x[:, :, :, :14].max() < -0.9 and x[:, :, :, 18:].min() > 0.9
    path = moving_bar_video(tmp_path / "bar.mp4")
    clip = sample_clip(path, ClipSpec(frames=5, height=32, width=32), np.random.default_rng(0))
    assert clip.pixels.shape == (3, 5, 32, 32) and clip.pixels.dtype == torch.float32 and clip.repeated == 0
    assert sample_clip(path, ClipSpec(frames=9, stride=2, height=32, width=32), np.random.default_rng(0)).repeated == 4


def test_fps_resamples_the_source_frame_rate(tmp_path):
    """--fps: a 24 fps video read at 8 fps takes every 3rd frame; fractional ratios round per frame."""
    idx = clip_indices(100, 5, 30 / 8, np.random.default_rng(1))
    assert [i - idx[0] for i in idx] == [0, 4, 8, 11, 15]
    path = moving_bar_video(tmp_path / "bar24.mp4", frames=13, fps=24)
    assert video_fps(path) == pytest.approx(24.0)
    spec = ClipSpec(frames=5, height=64, width=64, fps=8)
    assert spec.spacing(24.0) == 3.0 and ClipSpec(stride=2).spacing(None) == 2.0
    clip = sample_clip(path, spec, np.random.default_rng(0))
    # the bar moves 4 px a source frame: 12 px between two clip frames read at 8 fps
    cols = [int(torch.argmax(clip.pixels[0, f, 32]).item()) for f in range(5)]
    assert [b - a for a, b in itertools.pairwise(cols)] == [12, 12, 12, 12] and clip.repeated == 0
    with pytest.raises(ValidationError, match=r"give stride \(2\) or fps \(8\), not both"):
        ClipSpec(stride=2, fps=8)
    with pytest.raises(ValueError, match="no frame rate to resample to fps=8"):
        spec.spacing(0.0)


def test_gif_writer(tmp_path):
    frames = np.zeros((3, 8, 10, 3), dtype=np.uint8)
    frames[1] = 255
    gif = Image.open(write_gif(frames, tmp_path / "a.gif"))
    assert gif.n_frames == 3 and gif.size == (10, 8)


def test_auto_reads_with_pyav_what_decord_refuses(tmp_path):
    """decord 0.6 refuses valid H.264 48 pixels wide ("from_size == to_size"): prepare skipped such videos as
    unreadable. ``auto`` now reads them with PyAV; a file neither reads names both errors."""
    path = moving_bar_video(tmp_path / "narrow.mp4", size=48)
    with pytest.raises(Exception, match="from_size == to_size"):
        read_frames(path, [0, 1], "decord")  # the premise: if a decord release fixes it, this test says so
    expected = read_frames(path, [0, 1], "pyav")
    assert np.array_equal(read_frames(path, [0, 1]), expected) and count_frames(path) == 9
    (tmp_path / "junk.mp4").write_bytes(b"not a video")
    with pytest.raises(OSError, match=r"unreadable video \(PyAV: .*; decord: "):
        read_frames(tmp_path / "junk.mp4", [0])
