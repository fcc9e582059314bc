import pytest
import torch

from selfflow.core.modulation import (
    TokenTimesteps,
    gate_levels,
    modulate,
    modulate_levels,
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
    x, shift, scale = torch.randn(2, 6, 8), torch.randn(2, 1, 8), torch.randn(2, 1, 8)
    assert torch.equal(modulate_levels(x, shift, scale, tt.index), modulate(x, shift, scale))
    assert torch.equal(gate_levels(x, scale, shift * x, tt.index), x + scale * (shift * x))


def test_timestep_embedding_is_sinusoidal():
    e = timestep_embedding(torch.tensor([0.0, 0.5]), 8)
    assert e.shape == (2, 8)
    assert torch.allclose(e[0], torch.tensor([1.0] * 4 + [0.0] * 4))


def _levels(levels: int) -> torch.Tensor:
    torch.manual_seed(0)
    index = torch.randint(0, levels, (3, 40)) if levels > 2 else (torch.rand(3, 40) < 0.25).long()
    index[2] = 0  # a sample whose other levels no token uses: their gradients are zero
    return index


def _plain(x, shift, scale, gate, out, index):
    """The per-token expressions, autograd's way: gather the levels to the tokens, then modulate and gate."""
    take = [p.gather(1, index.unsqueeze(-1).expand(-1, -1, p.shape[-1])) for p in (shift, scale, gate)]
    return modulate(x, take[0], take[1]), x + take[2] * out


def _ours(x, shift, scale, gate, out, index):
    return modulate_levels(x, shift, scale, index), gate_levels(x, gate, out, index)


@pytest.mark.parametrize("levels", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_level_modulation_equals_autograd_of_the_per_token_expressions(levels, dtype):
    """Values bitwise those of modulating with the gathered vectors; gradients autograd's (the per-level sums in
    another order), in fp32 and with bf16 levels and outputs on an fp32 stream as under autocast."""
    index = _levels(levels)
    x = torch.randn(3, 40, 16, requires_grad=True)  # the fp32 norm output / residual stream
    shift, scale, gate = (torch.randn(3, levels, 16, dtype=dtype, requires_grad=True) for _ in range(3))
    out = torch.randn(3, 40, 16, dtype=dtype, requires_grad=True)
    grads = torch.randn(3, 40, 16), torch.randn(3, 40, 16)
    inputs = (x, shift, scale, gate, out)
    ours, plain = _ours(*inputs, index), _plain(*inputs, index)
    assert all(torch.equal(o, p) for o, p in zip(ours, plain, strict=True))
    got = torch.autograd.grad(ours, inputs, grads)
    expected = torch.autograd.grad(plain, inputs, grads)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for g, e, i in zip(got, expected, inputs, strict=True):
        assert g.dtype == i.dtype and g.shape == i.shape
        torch.testing.assert_close(g, e, rtol=tol, atol=tol)
    for g in got[1:4]:
        assert torch.equal(g[2, 1:], torch.zeros_like(g[2, 1:]))


@pytest.mark.parametrize("levels", [2, 3])
def test_level_modulation_compiled_equals_eager(levels):
    """Compiled blocks trace the functions and their backward (masked sums there for two levels, a batched
    product in eager) into their graph: the same values and gradients as eager."""
    index = _levels(levels)
    inputs = (torch.randn(3, 40, 16, requires_grad=True), *(torch.randn(3, levels, 16, requires_grad=True)
                                                            for _ in range(3)),
              torch.randn(3, 40, 16, requires_grad=True))
    grads = torch.randn(3, 40, 16), torch.randn(3, 40, 16)
    eager_out = _ours(*inputs, index)
    eager = torch.autograd.grad(eager_out, inputs, grads)
    compiled_out = torch.compile(_ours, fullgraph=True)(*inputs, index)
    compiled = torch.autograd.grad(compiled_out, inputs, grads)
    assert all(torch.equal(c, e) for c, e in zip(compiled_out, eager_out, strict=True))
    for c, e in zip(compiled, eager, strict=True):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)


def test_a_block_keeps_no_per_token_modulation_for_its_backward():
    """With two levels a DiT block keeps for its backward what it keeps with one: its modulation stays per
    level. Autograd of the plain expressions kept each ``1 + scale`` and each gate per token, four ``(B, L, D)``
    more a block."""
    from selfflow.core.dit import DiTBlock

    torch.manual_seed(0)
    block = DiTBlock(32, 4, 64)
    x, c2, c1 = torch.randn(2, 64, 32, requires_grad=True), torch.randn(2, 2, 32), torch.randn(2, 1, 32)
    index = (torch.rand(2, 64) < 0.25).long()

    def saved_bytes(c, index) -> int:
        seen: dict[int, int] = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            block(x, c, index, "sdpa")
        return sum(seen.values())

    per_token = 2 * 64 * 32 * 4  # one (B, L, D) fp32
    assert saved_bytes(c2, index) - saved_bytes(c1, None) < per_token


def test_compiled_level_backward_is_reduced_inside_inductor_kernels():
    """Under torch.compile the two-level modulation's backward is plain sums, which Inductor folds into the
    kernel that makes the per-token gradient; a batched product would be a kernel of its own, reading that
    gradient written out in full."""
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    index = (torch.rand(2, 32) < 0.25).long()
    per = torch.randn(2, 2, 8, requires_grad=True)
    x = torch.randn(2, 32, 8)
    zero = torch.zeros(2, 2, 8)
    scaled = torch.compile(lambda p: modulate_levels(x, zero, p, index).square().sum(), fullgraph=True)
    _, code = run_and_get_code(lambda: scaled(per).backward())
    assert code and not any("bmm" in c for c in code)
    reference = (x * (1 + torch.where(index.bool().unsqueeze(-1), per[:, 1:2], per[:, :1]))).square().sum()
    torch.testing.assert_close(per.grad, torch.autograd.grad(reference, per)[0], rtol=1e-5, atol=1e-5)
