"""Video reading and StyleGAN-V's clip selection."""

from __future__ import annotations

import numpy as np
from PIL import Image

from selfflow.eval.video_io import (
    ClipReport,
    is_stats_file,
    iter_clips,
    iter_frames,
    list_videos,
    read_video,
)


def test_clip_selection_start_stride_and_short_videos() -> None:
    vids = [np.broadcast_to(np.arange(t, dtype=np.uint8)[:, None, None, None], (t, 4, 4, 3)).copy()
            for t in (40, 10, 16, 32, 33)]
    report = ClipReport()
    clips = list(iter_clips(vids, 16, 2048, start=1, stride=2, report=report))
    # StyleGAN-V keeps a video with ≥ 16·stride frames after the start: 1 + 32 = 33 here, so the
    # 32-frame video is dropped although frames 1, 3, …, 31 exist
    assert report.used == 2 and report.skipped_short == 3
    assert report.lengths == [40, 33]
    for clip in clips:
        assert clip.shape == (16, 4, 4, 3)
        assert list(clip[:, 0, 0, 0]) == list(range(1, 32, 2))
    first = list(iter_clips(vids, 16, 1))
    assert len(first) == 1 and list(first[0][:, 0, 0, 0]) == list(range(16))
    # at stride 2 and start 0 a 31-frame video has frames 0, 2, …, 30 but is dropped (needs 32)
    short = ClipReport()
    assert list(iter_clips(vids[3:4], 16, 2048, stride=2, report=short)) != []
    assert list(iter_clips([vids[3][:31]], 16, 2048, stride=2, report=short)) == []
    assert (short.used, short.skipped_short) == (1, 1)


def test_frames_in_order_up_to_the_cap_and_stats_files() -> None:
    vids = [np.full((t, 2, 2, 3), t, dtype=np.uint8) for t in (3, 4)]
    frames = list(iter_frames(vids, 5))
    assert [int(f[0, 0, 0]) for f in frames] == [3, 3, 3, 4, 4]
    assert is_stats_file("real.npz") and not is_stats_file("videos/") and not is_stats_file(vids)


def test_a_frame_folder_reads_in_frame_number_order_padded_or_not(tmp_path):
    for i in range(12):
        Image.fromarray(np.full((2, 2, 3), i, np.uint8)).save(tmp_path / f"frame{i + 1}.png")
    assert read_video(tmp_path)[:, 0, 0, 0].tolist() == list(range(12))


def test_list_videos_skips_the_parts_of_a_sample_out_dir(tmp_path):
    np.save(tmp_path / "000000.npy", np.zeros((2, 4, 4, 3), np.uint8))
    (tmp_path / "parts").mkdir()
    np.save(tmp_path / "parts" / "batch_000000.npy", np.zeros(0, np.uint8))
    (tmp_path / "frames").mkdir()  # a folder of frames is still a video
    np.savez(tmp_path / "samples_3.npz", arr_0=np.zeros((3, 4, 4, 3), np.uint8))  # an image out-dir's ADM batch
    assert [p.name for p in list_videos(tmp_path)] == ["000000.npy", "frames"]
