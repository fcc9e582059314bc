import numpy as np
import pytest
import torch

from selfflow.image import digits
from selfflow.image.digits import NUM_TRAIN, digits_batch, digits_split
from selfflow.image.modality import ImageModality


def test_the_split_is_fixed_disjoint_and_covers_the_data():
    train, test = digits._split_indices()
    assert len(train) == NUM_TRAIN and len(test) == 1797 - NUM_TRAIN
    assert not set(train.tolist()) & set(test.tolist())
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(1797))
    digits._split_indices.cache_clear()
    again, _ = digits._split_indices()
    assert np.array_equal(train, again)  # recomputed from the fixed seed, not only cached


def test_split_images_are_in_range_at_the_requested_size():
    images, labels = digits_split("test", 16)
    assert images.shape == (297, 3, 16, 16) and labels.shape == (297,)
    assert images.min() >= -1 and images.max() <= 1 and set(labels.tolist()) == set(range(10))
    with pytest.raises(ValueError, match="'val'"):
        digits_split("val")


def test_the_stream_reads_only_the_training_split_one_epoch_at_a_time():
    images, labels = digits_batch(0, range(NUM_TRAIN))
    train, train_labels = digits_split("train")
    assert torch.equal(labels.sort().values, train_labels.sort().values)  # an epoch is a permutation
    assert torch.equal(images.flatten(1).sum(1).sort().values, train.flatten(1).sum(1).sort().values)
    assert torch.equal(digits_batch(0, range(5))[0], digits_batch(0, [0, 1, 2, 3, 4])[0])
    assert not torch.equal(digits_batch(1, range(5))[0], digits_batch(0, range(5))[0])


def test_dataset_digits_in_the_image_modality():
    mod = ImageModality({"dataset": "digits"})
    assert (mod.options.image_size, mod.options.patch_size) == (16, 2)
    assert mod.evaluator == "digits_probe" and mod.num_classes == 10
    batch = next(iter(mod.stream(4, seed=0)))
    tokens, cond = mod.encode(batch, "cpu")
    assert tokens.x.shape == (4, 64, 12) and torch.equal(cond.labels, batch["labels"])
    assert batch["captions"][0] == f"a handwritten digit {int(batch['labels'][0])}"
    assert torch.equal(mod.decode(tokens.x), batch["media"])
