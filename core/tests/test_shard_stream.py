import io
import logging
import re
import tarfile
from functools import partial

import numpy as np
import pytest
import torch
import webdataset as wds

from selfflow.core.data.shard_format import decode_sample, npy_bytes, shard_urls
from selfflow.core.data.shard_stream import ShardStream
from selfflow.core.data.shard_writer import write_shards

GOOD = npy_bytes(np.zeros((2, 3)))

def _process(i):
    return {"latent": np.full((2, 3), float(i), dtype=np.float32), "caption": f"item {i}", "label": i % 2,
            "emb": np.ones((i % 3 + 1, 4), dtype=np.float32)}

def _keys(batches):
    return sorted(int(c.split()[1]) for b in batches for c in b["captions"])

def _one_epoch(stream):
    it, batches = iter(stream), []
    while (b := next(it)) and stream.epoch == 0:
        batches.append(b)
    return batches

def _object_npy():
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return buf.getvalue()

def test_stream_splits_by_rank_resumes_and_skips_corrupt_members(tmp_path, caplog):
    write_shards(list(range(16)), lambda i: _process(i + 10), tmp_path, shard_size=4)
    with wds.TarWriter(str(tmp_path / "shard-000009.tar")) as sink:  # one corrupt member, one good
        sink.write({"__key__": "bad", "latent.npy": b"garbage", "txt": "item 90"})
        sink.write({"__key__": "ok", "latent.npy": GOOD, "txt": "item 91"})
    (tmp_path / "shard-000010.tar").write_bytes(b"\x00" * 100 + b"not a tar")  # a broken shard, no report
    urls = shard_urls(tmp_path)
    assert len(urls) == 6
    per_rank = [ShardStream(urls, 1, seed=0, rank=rank, world_size=2) for rank in range(2)]
    batches = [_one_epoch(s) for s in per_rank]
    keys0, keys1 = _keys(batches[0]), _keys(batches[1])
    assert not set(keys0) & set(keys1) and sorted(keys0 + keys1) == [*range(10, 26), 91]
    # the garbage member and the broken shard (each also counted again when epoch 1 reaches it first)
    assert set(re.findall(r"shard \S+/(shard-\d+\.tar), key (\S+)\)", caplog.text)) == {
        ("shard-000010.tar", "?"), ("shard-000009.tar", "bad")}
    assert sum(s.skipped for s in per_rank) >= 2 and sum(s.lost_shards for s in per_rank) >= 1
    assert "shard-000010.tar, key ?" in caplog.text and "shard-000009.tar, key bad)" in caplog.text
    # resume mid-epoch: the next batches are the ones an uninterrupted stream yields
    s = ShardStream(urls, 2, seed=3)
    it = iter(s)
    next(it)
    state = s.state_dict()
    expected = [next(it) for _ in range(3)]
    s2 = ShardStream(urls, 2, seed=3)
    s2.load_state_dict(state)
    it2 = iter(s2)
    got = [next(it2) for _ in range(3)]
    assert [b["captions"] for b in got] == [b["captions"] for b in expected]
    assert got[0]["latent"].shape == (2, 2, 3) and isinstance(got[0]["emb"][0], torch.Tensor)
    with pytest.raises(ValueError, match=r"split otherwise \(was 1×2, 0 workers; now 2×1, 0 workers\).*"
                                         "--resplit-data"):
        ShardStream(urls, 1, world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="cannot be split"):
        ShardStream(urls[:1], 1, rank=0, world_size=2)

BAD_MEMBERS = {
    "garbage": {"latent.npy": b"garbage"}, "object": {"latent.npy": _object_npy()},
    "trunc": {"latent.npy": GOOD[:-5]}, "nokey": {"emb.npy": npy_bytes(np.ones((1, 4)))},
    "shape": {"latent.npy": npy_bytes(np.zeros((3, 2)))},
    "dtype": {"latent.npy": npy_bytes(np.zeros((2, 3)), dtype=np.int32)},
    "nan": {"latent.npy": npy_bytes(np.full((2, 3), np.nan))},
    "inf": {"latent.npy": npy_bytes(np.full((2, 3), np.inf), dtype=np.float32)},
    "emb": {"latent.npy": GOOD, "emb.npy": npy_bytes(np.ones(4))},
    "cat": {"latent.npy": GOOD, "cls": "cat"}, "big": {"latent.npy": GOOD, "cls": "999999"},
    "neg": {"latent.npy": GOOD, "cls": "-3"},
}

@pytest.mark.parametrize("workers", [0, 2])
def test_every_corrupt_member_is_skipped_counted_and_named_and_resume_stays_exact(tmp_path, caplog, workers):
    caplog.set_level(logging.WARNING, "selfflow.shards")
    with wds.TarWriter(str(tmp_path / "s-000000.tar")) as sink:
        sink.write({"__key__": "first", "latent.npy": GOOD, "txt": "item 0", "cls": "1"})
        for key, members in BAD_MEMBERS.items():
            sink.write({"__key__": key, **members, "txt": "item 9"})
        for i in range(1, 5):
            sink.write({"__key__": f"last{i}", "latent.npy": GOOD, "txt": f"item {i}", "cls": "2"})

    stream = ShardStream(shard_urls(tmp_path), 1, decode=partial(decode_sample, num_classes=10),
                         num_workers=workers)
    it = iter(stream)
    first = next(it)
    assert _keys([first]) == [0] and stream.skipped == 0
    state = stream.state_dict()
    second = next(it)  # all the bad members lie between the first and the second good sample
    assert _keys([second]) == [1] and stream.skipped == len(BAD_MEMBERS)
    for key in BAD_MEMBERS:
        assert f"s-000000.tar, key {key})" in caplog.text
    assert "(shard ?" not in caplog.text and "key ?)" not in caplog.text
    assert "key garbage): ValueError: not a .npy array (garbage bytes" in caplog.text
    assert "allow_pickle" not in caplog.text  # numpy's advice to load it unsafely is not passed on
    resumed = ShardStream(shard_urls(tmp_path), 1, decode=partial(decode_sample, num_classes=10),
                          num_workers=workers)
    resumed.load_state_dict(state)
    rit = iter(resumed)
    assert [_keys([next(rit)]) for _ in range(4)] == [[1], [2], [3], [4]]
    assert resumed.skipped == len(BAD_MEMBERS)  # the skips after the saved position, counted once

def test_truncated_and_unreadable_shards_count_the_samples_they_held(tmp_path, caplog):
    write_shards(list(range(12)), _process, tmp_path, shard_size=4, order_seed=None)  # 4 per shard, in order
    whole = (tmp_path / "shard-000001.tar").read_bytes()
    (tmp_path / "shard-000001.tar").write_bytes(whole[: len(whole) // 2])  # truncated mid-shard
    (tmp_path / "shard-000002.tar").write_bytes(b"\x00" * 100 + b"not a tar")  # unreadable
    stream = ShardStream(shard_urls(tmp_path), 1)
    good = _keys(_one_epoch(stream))
    lost = {"shard-000001": 0, "shard-000002": 0}
    # The stream may already have begun the next epoch (shard order is shuffled per epoch): a message seen
    # twice is the same skip read again, so count each (shard, key, reason) once.
    messages = set(re.findall(r"skipping (\d+) corrupt sample\(s\) \(shard \S+/(shard-\d+)\.tar, key ([^)]*)\)(.*)",
                              caplog.text))
    for n, shard, _key, _reason in messages:
        lost[shard] += int(n)
    assert lost["shard-000002"] == 4  # unreadable: all the samples its report lists
    assert len([k for k in good if 4 <= k < 8]) + lost["shard-000001"] == 4  # truncated: the ones after the cut
    assert 0 < lost["shard-000001"] < 4 and stream.lost_shards >= 1

def test_a_rank_with_only_unreadable_shards_stops_with_a_clear_error(tmp_path):
    (tmp_path / "a.tar").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"rank 0 read 0 valid sample\(s\) in a whole epoch of its 1 shard"):
        next(iter(ShardStream([str(tmp_path / "a.tar")], 1)))
    with pytest.raises(FileNotFoundError, match="no shards"):
        ShardStream([], 1)

def test_fewer_samples_than_one_batch_stop_with_a_clear_error_not_a_hang(tmp_path):
    write_shards(list(range(3)), _process, tmp_path, shard_size=2)
    with pytest.raises(ValueError, match=r"read 3 valid sample\(s\) .* fewer than one batch of 4"):
        next(iter(ShardStream(shard_urls(tmp_path), 4)))
    assert len(next(iter(ShardStream(shard_urls(tmp_path), 3)))["captions"]) == 3

def _shard(path, items):
    with wds.TarWriter(str(path)) as sink:
        for key, latent, caption in items:
            sink.write({"__key__": key, "latent.npy": latent, "txt": caption})

def test_a_resume_keeps_the_reference_shape_of_the_uninterrupted_run(tmp_path):
    """The reference shape comes from the run's first good sample, not from the first one a resume replays."""
    _shard(tmp_path / "a.tar", [(f"a{i}", GOOD, f"item {i}") for i in range(4)])
    _shard(tmp_path / "b.tar", [("bad", npy_bytes(np.zeros((3, 2))), "item 99"),
                                *((f"b{i}", GOOD, f"item {i}") for i in range(4, 8))])
    urls = shard_urls(tmp_path)

    def order(seed, epoch):
        return [u.rsplit("/", 1)[1] for u in ShardStream(urls, 2, seed=seed).epoch_shards(epoch)]

    seed = next(s for s in range(100) if order(s, 0) == ["a.tar", "b.tar"] and order(s, 1) == ["b.tar", "a.tar"])
    stream = ShardStream(urls, 2, seed=seed)
    it = iter(stream)
    for _ in range(5):  # epoch 0 (4 batches), then epoch 1's first batch, past the wrong-shaped sample
        next(it)
    assert stream.epoch == 1 and stream.shape == (2, 3)
    state = stream.state_dict()
    expected = [next(it)["captions"] for _ in range(3)]
    resumed = ShardStream(urls, 2, seed=seed)
    resumed.load_state_dict(state)
    rit = iter(resumed)
    assert [next(rit)["captions"] for _ in range(3)] == expected == [
        ["item 6", "item 7"], ["item 0", "item 1"], ["item 2", "item 3"]]
    with pytest.raises(ValueError, match=r"another shuffle buffer .* set shuffle_buffer: 0"):
        ShardStream(urls, 2, seed=seed, shuffle_buffer=8).load_state_dict(state)
    with pytest.raises(ValueError, match=r"was 1×2, 0 workers; now 1×4, 0 workers\): resume on 1 rank\(s\) with "
                                         r"batch 2 per rank and data.options.num_workers=0, or with --resplit-data "
                                         r".*train.init_from"):
        ShardStream(urls, 4, seed=seed).load_state_dict(state)

def test_nested_keys_group_members_like_webdataset(tmp_path):
    path = tmp_path / "n.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in [("d/x.latent.npy", GOOD), ("d/x.txt", b"item 7"), ("d/y.latent.npy", GOOD),
                           ("d/y.txt", b"item 8")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    batch = next(iter(ShardStream([str(path)], 2)))
    assert batch["captions"] == ["item 7", "item 8"]

def test_a_medium_prepared_without_its_caption_trains_on_the_empty_caption(tmp_path):
    """prepare keeps a video/WAV whose caption file is missing; its batch must not lose every caption."""
    _shard(tmp_path / "s.tar", [("a", GOOD, "item 0")])
    with wds.TarWriter(str(tmp_path / "t.tar")) as sink:
        sink.write({"__key__": "b", "latent.npy": GOOD})  # no txt member
    batch = next(iter(ShardStream(shard_urls(tmp_path), 2)))
    assert sorted(batch["captions"]) == ["", "item 0"]
    plain = tmp_path / "plain"
    plain.mkdir()
    with wds.TarWriter(str(plain / "u.tar")) as sink:  # class-conditional shards: no captions at all
        sink.write({"__key__": "c", "latent.npy": GOOD, "cls": "1"})
    assert "captions" not in next(iter(ShardStream(shard_urls(plain), 1)))


def test_a_shard_gone_from_the_disk_is_counted_as_lost_not_dropped(tmp_path, caplog):
    """A deleted .tar whose report stayed was left out of the listing: its samples were lost without a word."""
    write_shards(list(range(16)), lambda i: _process(i + 10), tmp_path, shard_size=4)
    (tmp_path / "shard-000001.tar").unlink()
    stream = ShardStream(shard_urls(tmp_path), 1, seed=0)
    assert "1 shard(s) listed by their reports are missing (shard-000001.tar)" in caplog.text
    batches = _one_epoch(stream)
    # the report's 4 samples, counted again when epoch 1 reads the shard before _one_epoch sees the epoch change
    # (whether epoch 1 reads it first depends on the seed's shard order)
    assert len(batches) == 12 and (stream.skipped, stream.lost_shards) in ((4, 1), (8, 2))
    assert "shard-000001.tar, key ?): unreadable shard: FileNotFoundError" in caplog.text


def test_the_data_order_does_not_depend_on_where_the_data_lies(tmp_path):
    """The epoch order hashes each shard's path below the shards' shared folder, not its full path: the same
    shards in another folder (another clone, another disk) give the same batches."""
    for where in ("a", "deeper/b"):
        write_shards(list(range(24)), _process, tmp_path / where / "train", shard_size=3)
    first, second = (ShardStream(shard_urls(tmp_path / w / "train"), 4, seed=1) for w in ("a", "deeper/b"))
    names = [[u.rsplit("/", 1)[1] for u in s.epoch_shards(e)] for s in (first, second) for e in (0, 1)]
    assert names[:2] == names[2:] and names[0] != sorted(names[0])
    assert [b["captions"] for b in _one_epoch(first)] == [b["captions"] for b in _one_epoch(second)]


def test_a_checkpoint_from_before_keeps_its_full_path_order(tmp_path, caplog):
    """A stream state without ``shard_order`` (written when the order hashed full paths) resumes in that order,
    with a warning, and says so in its own state; a new one records the order it reads in."""
    import hashlib

    write_shards(list(range(24)), _process, tmp_path, shard_size=3)
    urls = shard_urls(tmp_path)
    new = ShardStream(urls, 4, seed=1)
    assert new.state_dict()["shard_order"] == "path below the shards' shared folder"
    old_state = {k: v for k, v in new.state_dict().items() if k != "shard_order"}
    old = ShardStream(urls, 4, seed=1)
    with caplog.at_level(logging.WARNING):
        old.load_state_dict(old_state)
    full_path = sorted(old.urls, key=lambda u: hashlib.sha256(f"1/0/{u}".encode()).digest())
    assert old.epoch_shards(0) == full_path != new.epoch_shards(0)
    assert "keeps its full-path order" in caplog.text and old.state_dict()["shard_order"] == "full path"


def test_a_state_loads_on_the_same_shards_elsewhere_and_refuses_other_data(tmp_path):
    """The stream keeps each shard's name below the shared folder and its size with its position: the same
    shards in another folder resume (a copy's path is not its identity); shards added, renamed or of another
    size are refused, naming the difference; a shard gone since only counts as lost, as it would have."""
    import shutil

    write_shards(list(range(24)), _process, tmp_path / "a", shard_size=3)
    a = ShardStream(shard_urls(tmp_path / "a"), 4, seed=1)
    next(iter(a))
    state = a.state_dict()
    assert len(state["shard_sizes"]) == 8 and all(size > 0 for size in state["shard_sizes"].values())
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    b = ShardStream(shard_urls(tmp_path / "b"), 4, seed=1)
    b.load_state_dict(state)
    assert next(iter(b))["captions"] == next(iter(a))["captions"]

    shutil.copytree(tmp_path / "a", tmp_path / "c")
    (tmp_path / "c" / "shard-000007.tar").unlink()  # its .json report stays: the reader counts it as lost
    ShardStream(shard_urls(tmp_path / "c"), 4, seed=1).load_state_dict(state)
    (tmp_path / "c" / "shard-000007.json").unlink()  # no trace of it: the data now is other data
    with pytest.raises(ValueError, match=r"other data than it was reading \(8 shards then, 7 now; not there: "
                                         r"shard-000007.tar\)"):
        ShardStream(shard_urls(tmp_path / "c"), 4, seed=1).load_state_dict(state)
    with open(tmp_path / "b" / "shard-000002.tar", "ab") as f:
        f.write(b"\0" * 512)
    with pytest.raises(ValueError, match=r"other contents: shard-000002.tar \(\d+ bytes then, \d+ now\)"):
        ShardStream(shard_urls(tmp_path / "b"), 4, seed=1).load_state_dict(state)
    write_shards(list(range(27)), _process, tmp_path / "d", shard_size=3)
    with pytest.raises(ValueError, match=r"8 shards then, 9 now; new: shard-000008.tar"):
        ShardStream(shard_urls(tmp_path / "d"), 4, seed=1).load_state_dict(state)


def test_a_resplit_goes_on_from_the_next_epoch_with_the_skip_counts(tmp_path, caplog):
    """``--resplit-data``: positions read under 2 ranks × 2 go on under another split from the start of the epoch
    after the furthest rank's, the shards divided anew; the corrupt-sample counts carry over (all on rank 0 when
    the number of ranks changes, each rank its own when it does not); other data is still refused."""
    write_shards(list(range(16)), _process, tmp_path, shard_size=4)
    urls = shard_urls(tmp_path)
    states = []
    for rank in range(2):
        stream = ShardStream(urls, 2, seed=5, rank=rank, world_size=2)
        it = iter(stream)
        for _ in range(rank + 1):  # the ranks stand at different places of epoch 0
            next(it)
        states.append({**stream.state_dict(), "skipped": 3 + rank, "lost_shards": rank})
    assert [s["epoch"] for s in states] == [0, 0] and states[0]["consumed"] != states[1]["consumed"]

    one = ShardStream(urls, 3, seed=5)
    one.resplit_from(states)
    assert (one.epoch, one.consumed, one.skipped, one.lost_shards) == (1, 0, 7, 1)
    assert one.state_dict()["skipped"] == 7  # what the next checkpoint keeps
    fresh = ShardStream(urls, 3, seed=5)
    fresh.epoch = 1
    assert next(iter(one))["captions"] == next(iter(fresh))["captions"]
    assert ("read otherwise (was 2×2, 0 workers, shuffle buffer 0; now 1×3, 0 workers, shuffle buffer 0)" in
            caplog.text and "epoch 1" in caplog.text)
    # the same ranks, another batch: each rank keeps its own counts; more ranks: the others start at 0
    same_ranks = ShardStream(urls, 1, seed=5, rank=1, world_size=2)
    same_ranks.resplit_from(states)
    assert (same_ranks.epoch, same_ranks.skipped, same_ranks.lost_shards) == (1, 4, 1)
    more = [ShardStream(urls, 1, seed=5, rank=r, world_size=4) for r in range(4)]
    for stream in more:
        stream.resplit_from(states)
    assert [s.skipped for s in more] == [7, 0, 0, 0] and {s.epoch for s in more} == {1}
    # what StreamsState asks before it resplits: the same split and shuffle buffer carry the position as it is
    assert ShardStream(urls, 2, seed=5, rank=1, world_size=2).resumes_exactly(states[1])
    assert not ShardStream(urls, 2, seed=5, rank=1, world_size=2, shuffle_buffer=4).resumes_exactly(states[1])
    # nothing read yet: the same epoch
    start = ShardStream(urls, 2, seed=5)
    start.resplit_from([{**s, "consumed": 0} for s in states])
    assert start.epoch == 0
    with pytest.raises(ValueError, match="other data than it was reading"):
        ShardStream(urls[:-1], 3, seed=5).resplit_from(states)
