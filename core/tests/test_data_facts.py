"""What modalities read from their data is collected when a run is built and answers the reads when it is loaded."""

import pytest

from selfflow.core.data.data_facts import collecting, data_fact, is_recorded, replaying


def test_collected_when_read_and_replayed_without_reading():
    with collecting() as facts:
        assert data_fact("shards/codec.json", lambda: {"latent_shape": [4, 8]}) == {"latent_shape": [4, 8]}
    assert facts == {"shards/codec.json": {"latent_shape": [4, 8]}}

    def gone():
        raise FileNotFoundError("shards/codec.json")

    with replaying(facts), collecting() as again:  # a load away from the data: recorded, and kept for an export
        assert is_recorded("shards/codec.json") and not is_recorded("other")
        assert data_fact("shards/codec.json", gone) == {"latent_shape": [4, 8]}
        with pytest.raises(FileNotFoundError):  # what the record does not hold is read as usual
            data_fact("other", gone)
    assert again == facts
    with replaying(None), pytest.raises(FileNotFoundError):
        data_fact("shards/codec.json", gone)
