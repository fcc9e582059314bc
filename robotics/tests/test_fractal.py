"""Damaged RT-1 TFRecords: a bad record or file is skipped, named and counted, never a crash."""

import shutil

import pytest

from selfflow.robotics.fractal import (
    EpisodeError,
    TFRecordFrameError,
    read_episodes,
    tfrecord_frames,
    write_fake_shards,
)
from selfflow.robotics.prepare import prepare_rt1


@pytest.fixture
def shards(tmp_path):
    return write_fake_shards(tmp_path / "src", shards=2, episodes_per_shard=3, steps=(3, 4), size=(16, 16))


def _record_offsets(path):
    """Byte offsets where each record's frame starts."""
    offsets, at = [], 0
    for record, _ in tfrecord_frames(path):
        offsets.append(at)
        at += 16 + len(record)
    return offsets


def test_truncated_file_keeps_the_episodes_before_the_cut(shards):
    path = shards[0]
    cut = _record_offsets(path)[2] + 40
    path.write_bytes(path.read_bytes()[:cut])
    errors: list[dict] = []
    assert [e.meta["index"] for e in read_episodes(path, errors)] == [0, 1]
    assert len(errors) == 1 and errors[0]["index"] == 2 and path.name in errors[0]["error"]
    assert errors[0]["rest_of_file"]  # the file ends at the cut: what follows is not counted, and said so
    with pytest.raises(TFRecordFrameError, match="truncated"):
        list(read_episodes(path))


def test_flipped_byte_rejects_only_its_record(shards):
    path = shards[0]
    data = bytearray(path.read_bytes())
    data[_record_offsets(path)[1] + 100] ^= 0xFF
    path.write_bytes(bytes(data))
    errors: list[dict] = []
    assert [e.meta["index"] for e in read_episodes(path, errors)] == [0, 2]
    assert [e["index"] for e in errors] == [1] and "CRC" in errors[0]["error"] and "rest_of_file" not in errors[0]
    with pytest.raises(EpisodeError, match=r"\[1\]: record CRC"):
        list(read_episodes(path))


def test_garbage_header_and_unreadable_file_are_errors_not_crashes(shards, tmp_path):
    garbage = tmp_path / "garbage.tfrecord"
    garbage.write_bytes(b"\xff" * 64)
    errors: list[dict] = []
    assert list(read_episodes(garbage, errors)) == [] and "damaged record header" in errors[0]["error"]
    missing = tmp_path / "gone.tfrecord"
    errors = []
    assert list(read_episodes(missing, errors)) == [] and "FileNotFoundError" in errors[0]["error"]


def test_prepare_rt1_converts_around_a_corrupt_and_a_truncated_file(shards, tmp_path):
    src = shards[0].parent
    shutil.copy(shards[1], src / "fractal20220817_data-train.tfrecord-00002-of-00004")
    (src / "fractal20220817_data-train.tfrecord-00003-of-00004").write_bytes(b"not a tfrecord at all" * 9)
    shards[1].write_bytes(shards[1].read_bytes()[:-30])
    manifest = prepare_rt1({"input": str(src), "out": str(tmp_path / "out"), "val_fraction": 0.0})
    named = {(e["source"].rsplit("/", 1)[-1], e["index"]) for e in manifest["rejected"]}
    assert named == {(shards[1].name, 2), ("fractal20220817_data-train.tfrecord-00003-of-00004", 0)}
    assert manifest["episodes"]["train"] == 3 + 2 + 3
    from selfflow.robotics.prepare_cli import (
        _cut_short,  # the CLI's line: the unread rest is not counted
    )

    assert _cut_short(manifest["rejected"]) == " (2 file(s) cut short: their later episodes unread, uncounted)"
