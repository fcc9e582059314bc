import torch

from selfflow.core.rope import apply_rope, rope_cos_sin


def test_rope_preserves_norm_and_depends_on_relative_position():
    axes = (4, 6, 6)
    q = torch.randn(1, 2, 1, 16)
    k = torch.randn(1, 2, 1, 16)

    def score(pq, pk):
        cq, sq = rope_cos_sin(torch.tensor([[pq]]), axes, 10000.0)
        ck, sk = rope_cos_sin(torch.tensor([[pk]]), axes, 10000.0)
        rq, rk = apply_rope(q, cq, sq), apply_rope(k, ck, sk)
        assert torch.allclose(rq.norm(dim=-1), q.norm(dim=-1), atol=1e-5)
        return (rq * rk).sum(-1)

    # shifting both positions by the same offset leaves q·k unchanged; a different offset changes it
    assert torch.allclose(score([0, 1, 2], [1, 3, 0]), score([2, 4, 7], [3, 6, 5]), atol=1e-5)
    assert not torch.allclose(score([0, 1, 2], [1, 3, 0]), score([0, 1, 2], [1, 4, 0]), atol=1e-3)
