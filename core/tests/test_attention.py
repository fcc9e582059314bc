import pytest
import torch

from selfflow.core.attention import attention, resolve_backend


def test_backend_selection(monkeypatch):
    assert resolve_backend("auto", "cpu") == "sdpa"
    assert resolve_backend("math", "cpu") == "math"
    with pytest.raises(ValueError, match="xformers package and a CUDA device"):
        resolve_backend("xformers", "cpu")
    with pytest.raises(ValueError, match="one of"):
        resolve_backend("flash9", "cpu")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n: object() if n == "xformers" else real(n))
    assert resolve_backend("xformers", "cuda") == "xformers"
    with pytest.raises(ValueError, match="device: cpu"):
        resolve_backend("xformers", "cpu")


def test_sdpa_equals_math_with_and_without_mask():
    q, k, v = (torch.randn(2, 3, 7, 8) for _ in range(3))
    assert torch.allclose(attention(q, k, v, backend="sdpa"), attention(q, k, v, backend="math"), atol=1e-5)
    mask = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    mask[:, ..., 5:] = False
    out = attention(q, k, v, mask, backend="sdpa")
    assert torch.allclose(out, attention(q, k, v, mask, backend="math"), atol=1e-5)
    assert torch.allclose(out, attention(q[:, :, :], k[:, :, :5], v[:, :, :5], backend="math"), atol=1e-5)
