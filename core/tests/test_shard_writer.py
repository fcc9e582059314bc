import numpy as np

from selfflow.core.data.shard_writer import write_shards
from selfflow.core.data.stats import latent_stats


def _process(i):
    if i == 3:
        raise OSError("corrupt input file")
    return {"latent": np.full((2, 3), float(i), dtype=np.float32), "caption": f"item {i}", "label": i % 2,
            "emb": np.ones((i % 3 + 1, 4), dtype=np.float32)}


def test_write_is_resumable_counts_failures_and_keeps_stats(tmp_path):
    report = write_shards(list(range(10)), _process, tmp_path, prefix="a", shard_size=4, rank=0, world_size=2)
    assert report == {"written": 5, "skipped": 1, "shards": 2, "existing": 0}  # chunks 0 and 2
    report = write_shards(list(range(10)), _process, tmp_path, prefix="a", shard_size=4, rank=1, world_size=2)
    assert report["written"] == 4 and report["shards"] == 1
    again = write_shards(list(range(10)), _process, tmp_path, prefix="a", shard_size=4)
    assert again == {"written": 0, "skipped": 0, "shards": 0, "existing": 3}
    mean, std = latent_stats(tmp_path)
    values = np.array([i for i in range(10) if i != 3], dtype=np.float64)
    assert np.allclose(mean, values.mean()) and np.allclose(std, values.std())
