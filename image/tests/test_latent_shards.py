import io
import logging
import warnings

import numpy as np
import webdataset as wds

from selfflow.core.data.shard_format import npy_bytes
from selfflow.image.latent_shards import imagenet_stream


def test_nan_moments_and_bad_labels_skip_the_sample_not_the_step(tmp_path, caplog):
    caplog.set_level(logging.WARNING, "selfflow.shards")
    good = npy_bytes(np.concatenate([np.zeros((4, 2, 2)), np.ones((4, 2, 2))]), np.float32)  # mean 0, std 1
    bad = {"nan": {"moments.npy": npy_bytes(np.full((8, 2, 2), np.nan), np.float32), "cls": "1"},
           "cat": {"moments.npy": good, "cls": "cat"}, "big": {"moments.npy": good, "cls": "999999"},
           "neg": {"moments.npy": good, "cls": "-3"}, "nocls": {"moments.npy": good}}
    with wds.TarWriter(str(tmp_path / "shard-000000.tar")) as sink:
        sink.write({"__key__": "00000001", "moments.npy": good, "cls": "3"})
        for key, members in bad.items():
            sink.write({"__key__": key, **members})
        sink.write({"__key__": "00000002", "moments.npy": good, "cls": "4"})
    stream = imagenet_stream(str(tmp_path), 2, seed=0, rank=0, world_size=1, num_classes=10, shuffle_buffer=1)
    batch = next(iter(stream))
    assert batch["labels"].tolist() == [3, 4] and batch["latents"].shape == (2, 4, 2, 2)
    assert np.isfinite(batch["latents"].numpy()).all() and stream.skipped == len(bad)
    for key in bad:
        assert f"shard-000000.tar, key {key})" in caplog.text


def test_a_png_over_the_decompression_bomb_bound_skips_the_sample(tmp_path, caplog, monkeypatch):
    """PIL only warns between MAX_IMAGE_PIXELS and twice that, then decodes (a 12000² png: seconds and GBs);
    in a shard such a png is a corrupt sample: skipped, counted and logged, no warning (the bound is lowered
    here so the 'bomb' is small)."""
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64)
    caplog.set_level(logging.WARNING, "selfflow.shards")

    def png(side):
        buf = io.BytesIO()
        Image.new("RGB", (side, side)).save(buf, format="png")
        return buf.getvalue()

    moments = npy_bytes(np.zeros((8, 2, 2)), np.float32)
    with wds.TarWriter(str(tmp_path / "shard-000000.tar")) as sink:
        sink.write({"__key__": "00000001", "moments.npy": moments, "cls": "3", "png": png(8)})
        sink.write({"__key__": "bomb", "moments.npy": moments, "cls": "1", "png": png(10)})  # 100 px: warns only
        sink.write({"__key__": "00000002", "moments.npy": moments, "cls": "4", "png": png(8)})
    stream = imagenet_stream(str(tmp_path), 2, seed=0, rank=0, world_size=1, num_classes=10, pixels=True,
                             shuffle_buffer=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batch = next(iter(stream))
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert batch["labels"].tolist() == [3, 4] and batch["pixels"].shape == (2, 3, 8, 8) and stream.skipped == 1
    assert "shard-000000.tar, key bomb): ValueError: image bomb.png is too large to decode" in caplog.text
