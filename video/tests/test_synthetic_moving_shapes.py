import numpy as np

from selfflow.video.synthetic_moving_shapes import (
    CAPTIONS,
    CLASSES,
    DIRECTIONS,
    render_batch,
    render_clip,
)


def test_deterministic_by_seed_and_index():
    a, la = render_clip(0, 5)
    b, lb = render_clip(0, 5)
    c, _ = render_clip(1, 5)
    assert np.array_equal(a, b) and la == lb and not np.array_equal(a, c)
    assert a.shape == (3, 8, 32, 32) and a.dtype == np.float32 and a.min() >= -1 and a.max() <= 1


def test_shapes_move_in_the_captioned_direction():
    clips, labels, captions = render_batch(0, range(64), frames=8, size=32)
    assert set(labels.tolist()) == set(range(len(CLASSES)))
    for clip, label, caption in zip(clips.numpy(), labels.tolist(), captions):
        colour, shape, direction = CLASSES[label]
        assert caption == CAPTIONS[label] == f"a {colour} {shape} moving {direction}"
        fg = clip.max(0) > clip.max(0).min() + 0.5  # (T, H, W) foreground
        ys, xs = np.indices(fg.shape[1:])
        first = np.array([(xs * fg[0]).sum(), (ys * fg[0]).sum()]) / fg[0].sum()
        last = np.array([(xs * fg[-1]).sum(), (ys * fg[-1]).sum()]) / fg[-1].sum()
        dx, dy = DIRECTIONS[direction]
        moved = last - first
        assert moved[0] * dx + moved[1] * dy > 2.0, (caption, moved)  # > 2 px along the caption
        assert abs(moved[0] * dy) + abs(moved[1] * dx) < 0.5  # and not across it
        area = fg.sum((1, 2))
        assert area.min() > 0.8 * area.max()  # the shape is never cut off by the frame edge
