import pytest
import torch

from selfflow.core.tokens import Tokens, grid_ids, patchify, unpatchify


def test_patchify_round_trip_and_layout():
    latent = torch.randn(2, 3, 2, 8, 12)
    tok = patchify(latent, (1, 4, 4))
    assert tok.x.shape == (2, 2 * 2 * 3, 48)
    assert torch.equal(unpatchify(tok.x, (2, 2, 3), (1, 4, 4)), latent)
    # row-major over (t, h, w); channels ordered (c, pt, ph, pw)
    assert tok.ids[0, 4].tolist() == [0, 1, 1]
    assert torch.equal(tok.x[0, 0, :16], latent[0, 0, 0, :4, :4].reshape(-1))


def test_grid_ids_and_validation():
    ids = grid_ids(2, 3, 4, batch=5)
    assert ids.shape == (5, 24, 3) and ids[0, -1].tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="not divisible"):
        patchify(torch.randn(1, 3, 1, 7, 8), (1, 2, 2))
    with pytest.raises(ValueError, match="disagree"):
        Tokens(torch.randn(1, 4, 3), torch.zeros(1, 5, 3, dtype=torch.long))
