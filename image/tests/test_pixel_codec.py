import pytest
import torch

from selfflow.image.pixel_codec import PixelCodec


def test_round_trip_and_shapes():
    codec = PixelCodec(32, 4)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    tokens = codec.to_tokens(images)
    assert tokens.x.shape == (2, 64, 48) and codec.token_channels == 48 and codec.grid == (1, 8, 8)
    assert torch.equal(codec.from_tokens(tokens.x), images)
    assert tokens.ids[0, 9].tolist() == [0, 1, 1]
    with pytest.raises(ValueError, match="divisible"):
        PixelCodec(30, 4)
