import numpy as np
import pytest
import torch
import webdataset as wds

from selfflow.text.shards import (
    LatentShardStream,
    collate_samples,
    latent_stats,
    npy_bytes,
    shard_urls,
    write_shards,
)


def _items(n):
    return list(range(n))


def _process(i):
    if i == 3:
        raise OSError("corrupt input file")
    return {"latent": np.full((2, 3), float(i), dtype=np.float32), "caption": f"item {i}", "label": i % 2,
            "emb": np.ones((i % 3 + 1, 4), dtype=np.float32)}


def _keys(batches):
    return sorted(int(c.split()[1]) for b in batches for c in b["captions"])


def test_write_is_resumable_counts_failures_and_keeps_stats(tmp_path):
    report = write_shards(_items(10), _process, tmp_path, prefix="a", shard_size=4, rank=0, world_size=2)
    assert report == {"written": 5, "skipped": 1, "shards": 2, "existing": 0}  # chunks 0 and 2
    report = write_shards(_items(10), _process, tmp_path, prefix="a", shard_size=4, rank=1, world_size=2)
    assert report["written"] == 4 and report["shards"] == 1
    again = write_shards(_items(10), _process, tmp_path, prefix="a", shard_size=4)
    assert again == {"written": 0, "skipped": 0, "shards": 0, "existing": 3}
    mean, std = latent_stats(tmp_path)
    values = np.array([i for i in range(10) if i != 3], dtype=np.float64)
    assert np.allclose(mean, values.mean()) and np.allclose(std, values.std())


def test_stream_splits_by_rank_resumes_and_skips_corrupt_members(tmp_path, caplog):
    write_shards(_items(16), lambda i: _process(i + 10), tmp_path, shard_size=4)
    with wds.TarWriter(str(tmp_path / "shard-000009.tar")) as sink:  # one corrupt member, one good
        sink.write({"__key__": "bad", "latent.npy": b"garbage", "txt": "item 90"})
        sink.write({"__key__": "ok", "latent.npy": npy_bytes(np.zeros((2, 3))), "txt": "item 91"})
    (tmp_path / "shard-000010.tar").write_bytes(b"\x00" * 100 + b"not a tar")  # a broken shard
    urls = shard_urls(tmp_path)
    assert len(urls) == 6
    per_rank = []
    for rank in range(2):
        s = LatentShardStream(urls, 1, collate_samples, seed=0, rank=rank, world_size=2)
        it, batches = iter(s), []
        while (b := next(it)) and s.epoch == 0:  # one epoch of this rank
            batches.append(b)
        per_rank.append([*batches, s])
    keys0, keys1 = _keys(per_rank[0][:-1]), _keys(per_rank[1][:-1])
    assert not set(keys0) & set(keys1) and sorted(keys0 + keys1) == [*range(10, 26), 91]
    assert sum(r[-1].skipped for r in per_rank) == 2  # the garbage member and the broken shard
    assert "corrupt" in caplog.text
    # resume mid-epoch: the next batches are the ones an uninterrupted stream yields
    s = LatentShardStream(urls, 2, collate_samples, seed=3)
    it = iter(s)
    next(it)
    state = s.state_dict()
    expected = [next(it) for _ in range(3)]
    s2 = LatentShardStream(urls, 2, collate_samples, seed=3)
    s2.load_state_dict(state)
    it2 = iter(s2)
    got = [next(it2) for _ in range(3)]
    assert [b["captions"] for b in got] == [b["captions"] for b in expected]
    assert got[0]["latent"].shape == (2, 2, 3) and isinstance(got[0]["emb"][0], torch.Tensor)
    with pytest.raises(ValueError, match="world size"):
        LatentShardStream(urls, 1, collate_samples, world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="cannot be split"):
        LatentShardStream(urls[:1], 1, collate_samples, rank=0, world_size=2)


def test_stream_skips_wrong_shapes_dtypes_and_missing_keys_naming_shard_and_key(tmp_path, caplog):
    good = npy_bytes(np.zeros((2, 3)))
    bad = {"trunc": {"latent.npy": good[:-5]}, "nokey": {"emb.npy": npy_bytes(np.ones((1, 4)))},
           "shape": {"latent.npy": npy_bytes(np.zeros((3, 2)))},
           "dtype": {"latent.npy": npy_bytes(np.zeros((2, 3)), dtype=np.int32)},
           "nan": {"latent.npy": npy_bytes(np.full((2, 3), np.nan))},
           "emb": {"latent.npy": good, "emb.npy": npy_bytes(np.ones(4))}}
    with wds.TarWriter(str(tmp_path / "s-000000.tar")) as sink:
        sink.write({"__key__": "first", "latent.npy": good, "txt": "item 0"})
        for key, members in bad.items():
            sink.write({"__key__": key, **members, "txt": "item 9"})
        sink.write({"__key__": "last", "latent.npy": good, "txt": "item 1"})
    s = LatentShardStream(shard_urls(tmp_path), 2, collate_samples)
    batch = next(iter(s))
    assert _keys([batch]) == [0, 1] and s.skipped == len(bad)
    for key in bad:
        assert f"s-000000.tar, key {key})" in caplog.text
