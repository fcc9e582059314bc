import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from selfflow.robotics.fractal import write_fake_shards
from selfflow.robotics.prepare import prepare_rt1


@pytest.fixture(scope="session")
def fake_tfrecords(tmp_path_factory):
    """Two fake fractal shards (real key names), the last episode of shard 0 moves the base (bad)."""
    out = tmp_path_factory.mktemp("tfrecords")
    write_fake_shards(out, shards=2, episodes_per_shard=4, bad_episodes=1, seed=3)
    return out


@pytest.fixture(scope="session")
def prepared(fake_tfrecords, tmp_path_factory):
    out = tmp_path_factory.mktemp("rt1")
    manifest = prepare_rt1({"input": str(fake_tfrecords), "out": str(out), "val_fraction": 0.3})
    return out, manifest


@pytest.fixture(scope="session")
def fake_data_dir(tmp_path_factory):
    """The embedded default data set of the rt1 modality (generated + converted once per session)."""
    from selfflow.robotics.modality import make_fake_dataset

    return make_fake_dataset(tmp_path_factory.mktemp("rt1-fake"))
