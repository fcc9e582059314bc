import torch

from selfflow.core.modulation import (
    TokenTimesteps,
    gather_chunks,
    gather_levels,
    timestep_embedding,
)


def test_from_dense_factorises_exactly():
    t = torch.tensor([[0.3, 0.7, 0.3, 0.7, 0.3], [0.5, 0.5, 0.5, 0.5, 0.5], [0.9, 0.1, 0.2, 0.1, 0.9]])
    tt = TokenTimesteps.from_dense(t)
    assert tt.values.shape == (3, 3)
    assert torch.equal(tt.dense(), t)
    assert tt.counts().sum(1).tolist() == [5.0, 5.0, 5.0]


def test_single_level_uses_broadcast_path():
    tt = TokenTimesteps.from_dense(torch.full((2, 6), 0.4))
    assert tt.index is None and tt.values.shape == (2, 1)
    per = torch.randn(2, 1, 8)
    assert gather_levels(per, tt.index).shape == (2, 1, 8)


def test_timestep_embedding_is_sinusoidal():
    e = timestep_embedding(torch.tensor([0.0, 0.5]), 8)
    assert e.shape == (2, 8)
    assert torch.allclose(e[0], torch.tensor([1.0] * 4 + [0.0] * 4))


def test_two_level_select_matches_autograd_select():
    """The select's matrix-product backward gives the gradient of ``torch.where`` (fp32 and bf16)."""
    torch.manual_seed(0)
    index = (torch.rand(3, 40) < 0.25).long()
    index[2] = 0  # a sample whose second level no token uses: its gradient is zero
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        per = torch.randn(3, 2, 16, dtype=dtype, requires_grad=True)
        grad = torch.randn(3, 40, 16, dtype=dtype)
        out = gather_levels(per, index)
        (ours,) = torch.autograd.grad(out, per, grad)
        reference = torch.where(index.bool().unsqueeze(-1), per[:, 1:2], per[:, :1])
        (expected,) = torch.autograd.grad(reference, per, grad)
        assert torch.equal(out, reference)
        assert ours.dtype == dtype and ours.shape == per.shape
        torch.testing.assert_close(ours, expected, rtol=tol, atol=tol)
        assert torch.equal(ours[2, 1], torch.zeros(16, dtype=dtype))


def test_two_level_select_compiled_equals_eager():
    """Compiled blocks trace the select and its backward (masked sums there, a batched product in eager) into
    their graph: the same values and gradients as eager."""
    torch.manual_seed(0)
    index = (torch.rand(3, 40) < 0.25).long()
    per = torch.randn(3, 2, 16, requires_grad=True)
    grad = torch.randn(3, 40, 16)
    out = gather_levels(per, index)
    (eager,) = torch.autograd.grad(out, per, grad)
    compiled_out = torch.compile(gather_levels, fullgraph=True)(per, index)
    (compiled,) = torch.autograd.grad(compiled_out, per, grad)
    assert torch.equal(compiled_out, out)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_gather_chunks_equals_chunking_the_gathered_tensor():
    """Splitting before the gather gives the values and gradients of splitting after it, eager and compiled."""
    torch.manual_seed(0)
    index = (torch.rand(3, 40) < 0.25).long()
    per = torch.randn(3, 2, 6 * 8, requires_grad=True)
    grads = torch.randn(6, 3, 40, 8).unbind(0)
    after = gather_levels(per, index).chunk(6, dim=-1)
    expected = torch.autograd.grad(after, per, grads)[0]
    for fn in (gather_chunks, torch.compile(gather_chunks, fullgraph=True)):
        before = fn(per, index, 6)
        assert all(torch.equal(b, a) for b, a in zip(before, after, strict=True))
        torch.testing.assert_close(torch.autograd.grad(before, per, grads)[0], expected, rtol=1e-5, atol=1e-5)
    assert [p.shape for p in gather_chunks(per[:, :1], None, 6)] == [(3, 1, 8)] * 6


def test_compiled_select_backward_is_reduced_inside_inductor_kernels():
    """Under torch.compile the two-level select's backward is plain sums, which Inductor folds into the kernel
    that makes the per-token gradient; a batched product would be a kernel of its own, reading that gradient
    written out in full."""
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    index = (torch.rand(2, 32) < 0.25).long()
    per = torch.randn(2, 2, 8, requires_grad=True)
    x = torch.randn(2, 32, 8)
    scaled = torch.compile(lambda p: (x * gather_levels(p, index)).square().sum(), fullgraph=True)
    _, code = run_and_get_code(lambda: scaled(per).backward())
    assert code and not any("bmm" in c for c in code)
    reference = (x * torch.where(index.bool().unsqueeze(-1), per[:, 1:2], per[:, :1])).square().sum()
    torch.testing.assert_close(per.grad, torch.autograd.grad(reference, per)[0], rtol=1e-5, atol=1e-5)
