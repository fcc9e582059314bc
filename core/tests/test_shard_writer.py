import json

import numpy as np
import pytest

from selfflow.core.data.shard_format import shard_urls
from selfflow.core.data.shard_stream import read_shard
from selfflow.core.data.shard_writer import write_codec_record, write_shards
from selfflow.core.data.stats import latent_stats


def _process(i):
    if i == 3:
        raise OSError("corrupt input file")
    return {"latent": np.full((2, 3), float(i), dtype=np.float32), "caption": f"item {i}", "label": i % 2,
            "emb": np.ones((i % 3 + 1, 4), dtype=np.float32)}


def test_write_is_resumable_counts_failures_and_keeps_stats(tmp_path):
    first = write_shards(list(range(10)), _process, tmp_path, prefix="a", shard_size=4, rank=0, world_size=2)
    assert first["shards"] == 2 and first["existing"] == 0  # chunks 0 and 2
    second = write_shards(list(range(10)), _process, tmp_path, prefix="a", shard_size=4, rank=1, world_size=2)
    assert second["shards"] == 1
    assert (first["written"] + second["written"], first["skipped"] + second["skipped"]) == (9, 1)
    again = write_shards(list(range(10)), _process, tmp_path, prefix="a", shard_size=4)
    assert again == {"written": 0, "skipped": 0, "shards": 0, "existing": 3}
    mean, std = latent_stats(tmp_path)
    values = np.array([i for i in range(10) if i != 3], dtype=np.float64)
    assert np.allclose(mean, values.mean()) and np.allclose(std, values.std())


def _captions(url):
    return [raw["txt"].decode() for raw in read_shard(url)]


def test_shards_hold_a_recorded_random_order_and_a_changed_list_is_refused(tmp_path, caplog):
    """Sorted inputs (ImageNet by class) must not become shards of one class each: the reader only mixes a few."""
    items = [i for i in range(40) if i != 3]
    write_shards(items, _process, tmp_path, shard_size=8)
    shards = [_captions(u) for u in shard_urls(tmp_path)]
    assert sorted(c for shard in shards for c in shard) == sorted(f"item {i}" for i in items)  # each once
    assert shards[0] != [f"item {i}" for i in items[:8]]  # not the sorted run
    assert all(max(int(c.split()[1]) for c in shard) - min(int(c.split()[1]) for c in shard) > 16 for shard in shards)
    assert write_shards(items, _process, tmp_path, shard_size=8)["existing"] == 5  # the same list resumes
    with pytest.raises(ValueError, match=r"another item list or order \(items 39 then, 40 now, keys_sha256"):
        write_shards([*items, 99], _process, tmp_path, shard_size=8)
    with pytest.raises(ValueError, match="seed 0 then, 1 now"):
        write_shards(items, _process, tmp_path, shard_size=8, order_seed=1)
    with pytest.raises(ValueError, match="shard_size 8 then, 4 now"):  # it took the 8-item shards as done
        write_shards(items, _process, tmp_path, shard_size=4)
    # a directory begun before the order record existed finishes in its sorted order
    legacy = tmp_path / "legacy"
    write_shards(items, _process, legacy, shard_size=8, order_seed=None)
    (legacy / "shard.order.json").unlink()
    (legacy / "shard-000004.tar").unlink()
    write_shards(items, _process, legacy, shard_size=8)
    assert _captions(legacy / "shard-000004.tar") == [f"item {i}" for i in items[32:]]
    assert "keep the sorted item order" in caplog.text


def test_a_rerun_with_other_settings_is_refused_and_a_killed_runs_shard_is_cleared(tmp_path):
    """A rerun with another --image-size used to rewrite codec.json over shards of the old size (and train on them);
    a killed run's half-written .tmp stayed beside the shards."""
    record = {"codec": "pixel", "image_size": 32, "latent_shape": [3, 32, 32], "sample_captions": ["a"]}
    write_codec_record(tmp_path, record)
    write_codec_record(tmp_path, {**record, "image_size": 64})  # no shards yet: nothing to contradict
    write_codec_record(tmp_path, record)
    (tmp_path / "a-000000.tar.999.tmp").write_bytes(b"half a shard")
    write_shards(list(range(4)), _process, tmp_path, prefix="a", shard_size=4)
    assert not list(tmp_path.glob("*.tmp"))
    write_codec_record(tmp_path, {**record, "sample_captions": ["b"]})  # drawn again: not a setting
    with pytest.raises(ValueError, match=r"holds shards prepared with other settings \(image_size 32 then, 64 now; "
                                         r"latent_shape \[3, 32, 32\] then, \[3, 64, 64\] now;"):
        write_codec_record(tmp_path, {**record, "image_size": 64, "latent_shape": [3, 64, 64]})
    assert json.loads((tmp_path / "codec.json").read_text())["image_size"] == 32  # not rewritten


def test_a_prepare_resumes_with_its_input_moved(tmp_path):
    """The order record hashes the item keys below their shared folder: a prepare stopped half-way resumes after
    its input moved (the keys were full paths, and the rerun was refused as another item list); a record from
    before, which hashed the full paths, still accepts the same list."""
    import hashlib

    def _from_path(key: str) -> dict:
        return {"latent": np.zeros((2, 3), dtype=np.float32), "caption": key.rsplit("/", 1)[1]}

    here = [f"/data/here/class{i % 3}/img{i}.png" for i in range(12)]
    there = [k.replace("/data/here/", "/scratch/job7/in/") for k in here]
    first = write_shards(here, _from_path, tmp_path, shard_size=4, world_size=3)
    assert (first["shards"], first["existing"]) == (1, 0)
    assert write_shards(there, _from_path, tmp_path, shard_size=4, rank=1, world_size=3)["shards"] == 1
    with pytest.raises(ValueError, match="another item list"):
        write_shards([*there[:-1], "/scratch/job7/in/class2/other.png"], _from_path, tmp_path, shard_size=4, rank=2,
                     world_size=3)
    record = json.loads((tmp_path / "shard.order.json").read_text())
    record["keys_sha256"] = hashlib.sha256("\n".join(here).encode()).hexdigest()  # as written before
    (tmp_path / "shard.order.json").write_text(json.dumps(record))
    assert write_shards(here, _from_path, tmp_path, shard_size=4, rank=2, world_size=3)["shards"] == 1
