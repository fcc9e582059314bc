import numpy as np
import pytest
import torch
from PIL import Image

from selfflow.core.registry import get_modality
from selfflow.image.modality import ImageModality


def test_registered_through_entry_point():
    assert get_modality("image") is ImageModality


def test_stream_is_resumable_and_sharded():
    mod = ImageModality({"image_size": 16})
    s = mod.stream(4, seed=0)
    it = iter(s)
    next(it)
    state = s.state_dict()
    expected = next(it)
    s2 = mod.stream(4, seed=0)
    s2.load_state_dict(state)
    again = next(iter(s2))
    assert torch.equal(expected["media"], again["media"]) and torch.equal(expected["labels"], again["labels"])
    r0 = next(iter(mod.stream(2, 0, rank=0, world_size=2)))
    r1 = next(iter(mod.stream(2, 0, rank=1, world_size=2)))
    single = next(iter(mod.stream(4, 0)))
    assert torch.equal(torch.cat([r0["media"], r1["media"]]), single["media"])
    with pytest.raises(ValueError, match=r"stopped after 4 samples, which is not a whole number of micro-batches"):
        mod.stream(3, 0).load_state_dict(state)
    halves = mod.stream(2, 0)  # the same samples on another split: 4 consumed = 2 micro-batches of 2
    halves.load_state_dict(state)
    assert torch.equal(torch.cat([next(iter(halves))["media"], next(iter(halves))["media"]]), expected["media"])


def test_encode_decode_and_grid(tmp_path):
    mod = ImageModality({"image_size": 16, "patch_size": 2})
    batch = next(iter(mod.stream(3, 0)))
    tokens, cond = mod.encode(batch, "cpu")
    assert tokens.x.shape == (3, 64, 12) and torch.equal(cond.labels, batch["labels"])
    assert torch.equal(mod.decode(tokens.x), batch["media"])
    assert mod.sample_ids(2, "cpu").shape == (2, 64, 3)
    cond, null, labels = mod.sample_conditions(12, "cpu")
    assert labels.tolist()[:11] == [*range(10), 0] and (null.labels == 10).all()
    assert mod.sample_conditions(torch.tensor([13, 2]), "cpu")[2].tolist() == [3, 2]  # by index: i mod 10
    assert mod.sample_conditions(np.int64(3), "cpu")[2].tolist() == [0, 1, 2]  # a count, whatever its integer type
    path = mod.save_samples(batch["media"], batch["labels"], tmp_path / "g")
    assert path.suffix == ".png" and Image.open(path).mode == "RGB" and not path.with_suffix(".txt").exists()
    captioned = ImageModality({"image_size": 16, "patch_size": 2, "conditioning": "text", "text": {"dim": 8}})
    batch = next(iter(captioned.stream(2, 0)))
    grid = captioned.save_samples(batch["media"], torch.tensor([0, 1]), tmp_path / "c")
    names = captioned.class_names
    assert grid.with_suffix(".txt").read_text() == f"0: {names[0]}\n1: {names[1]}\n"  # as video/audio previews
    with pytest.raises(ValueError, match="patch_size"):
        ImageModality({"patch_size": 0})


def test_an_option_of_another_dataset_is_an_error_naming_it():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"synthetic_shapes\.flip\n  Extra inputs are not permitted"):
        ImageModality({"flip": True})
    with pytest.raises(ValidationError, match=r"latent_shards\.data_seed\n  Extra inputs are not permitted"):
        ImageModality({"dataset": "latent_shards", "shards": "x", "codec": "sd_vae", "data_seed": 1})
    with pytest.raises(ValidationError, match=r"image_text_shards\.shards\n  Field required"):
        ImageModality({"dataset": "image_text_shards"})
    with pytest.raises(ValueError, match=r"dataset must be one of .* got 'imagenet'"):
        ImageModality({"dataset": "imagenet"})


def test_where_things_lie_is_declared_option_by_option():
    """The options a resume may see changed: data and cache locations (any change), model folders (the same files
    moved), nested option models (``text``) included — everything else about the data is fixed for a run."""
    from types import SimpleNamespace

    from selfflow.core.modality import location_options, model_location_options
    from selfflow.image.modality import ImageNetShardsOptions

    shapes = ImageModality({"conditioning": "text", "image_size": 16, "patch_size": 2})
    assert sorted(model_location_options(shapes)) == ["repa_encoder", "text.model_dir", "vae_path"]
    assert location_options(shapes) == ["text.cache_dir"]
    shards = SimpleNamespace(options=ImageNetShardsOptions(dataset="latent_shards", shards="x"))  # no data read
    assert sorted(location_options(shards)) == ["shards", "text.cache_dir"]
