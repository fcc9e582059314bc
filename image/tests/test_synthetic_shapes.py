import numpy as np
import torch

from selfflow.image.synthetic_shapes import CLASSES, render_batch, render_sample


def test_deterministic_by_seed_and_index():
    a, la = render_sample(0, 17)
    b, lb = render_sample(0, 17)
    c, _ = render_sample(1, 17)
    assert np.array_equal(a, b) and la == lb and not np.array_equal(a, c)
    assert a.shape == (3, 32, 32) and a.dtype == np.float32 and a.min() >= -1 and a.max() <= 1


def test_classes_differ_in_shape_and_colour():
    assert len(CLASSES) >= 8
    assert len({c for c, _ in CLASSES}) >= 4 and len({s for _, s in CLASSES}) >= 4
    images, labels = render_batch(0, range(400))
    assert set(labels.tolist()) == set(range(len(CLASSES)))
    # the dominant foreground colour of each class's mean image matches its colour name
    for cls in range(len(CLASSES)):
        fg = images[labels == cls]
        bright = fg.amax(dim=1, keepdim=True) > 0  # foreground pixels
        mean_rgb = (fg * bright).sum((0, 2, 3)) / bright.sum()
        colour = CLASSES[cls][0]
        channel = {"red": 0, "green": 1, "blue": 2}.get(colour)
        if channel is not None:
            assert int(torch.argmax(mean_rgb)) == channel, (cls, mean_rgb)
