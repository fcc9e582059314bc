"""The oneDNN Linear equals ``F.linear`` (values and gradients) and steps aside where it must."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import selfflow.core.linear as linear_module
from selfflow.core.linear import FEW_ROWS, MIN_WORK, Linear, linear, onednn_linear

needs_onednn = pytest.mark.skipif(not linear_module._onednn_available(), reason="PyTorch built without oneDNN")


@pytest.fixture(autouse=True)
def _on():
    with onednn_linear(True):  # whatever the machine's default (off but on x86-64) or SELFFLOW_ONEDNN_LINEAR say
        yield


def _counting():
    """Patch the oneDNN product so a test sees whether it ran."""
    calls = []
    real = linear_module._matmul

    def spy(x, weight, bias):
        calls.append(tuple(x.shape))
        return real(x, weight, bias)

    return mock.patch.object(linear_module, "_matmul", spy), calls


@needs_onednn
@pytest.mark.parametrize("shape", [(2, 3, 256), (3, 256), (2, 128, 256)])  # few rows (adaLN levels), 3, many
@pytest.mark.parametrize("bias", [True, False])
def test_values_and_gradients_equal_f_linear(shape, bias):
    torch.manual_seed(0)
    x = torch.randn(*shape, requires_grad=True)
    w = torch.randn(1536, 256, requires_grad=True)
    b = torch.randn(1536, requires_grad=True) if bias else None
    g = torch.randn(*shape[:-1], 1536)
    patch, calls = _counting()
    with patch:
        out = linear(x, w, b)
        grads = torch.autograd.grad(out, [x, w] + ([b] if bias else []), g)
    ref = F.linear(x, w, b)
    ref_grads = torch.autograd.grad(ref, [x, w] + ([b] if bias else []), g)
    rows = x.numel() // 256
    assert calls and calls[0] == (rows, 256)  # the forward ran through oneDNN
    assert len(calls) == (3 if rows <= FEW_ROWS else 1)  # and so did a few rows' backward
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-4)  # fp32 sums of 256 terms ~16 in size, another order
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-4)
    assert grads[1].is_contiguous()  # the weight's own layout: AccumulateGrad takes it without a copy


def test_frozen_weight_and_input_without_grad():
    torch.manual_seed(0)
    layer = Linear(64, 256)
    layer.weight.requires_grad_(False)
    x = torch.randn(40, 64, requires_grad=True)
    (gx,) = torch.autograd.grad(layer(x).square().sum(), [x])
    (ref,) = torch.autograd.grad(F.linear(x, layer.weight, layer.bias).square().sum(), [x])
    torch.testing.assert_close(gx, ref, rtol=1e-5, atol=1e-4)
    layer.weight.requires_grad_(True)
    out = layer(torch.randn(40, 64))
    out.sum().backward()
    assert layer.weight.grad is not None and layer.bias.grad is not None
    with torch.no_grad():
        assert layer(torch.randn(40, 64)).grad_fn is None


@needs_onednn
def test_steps_aside_to_f_linear():
    """Autocast, dispatch modes (the FLOP counter), tiny products, float64 and the switch all take F.linear."""
    torch.manual_seed(0)
    layer = Linear(96, 384)
    x = torch.randn(64, 96)
    patch, calls = _counting()
    with patch:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer(x).dtype == torch.bfloat16
        with FlopCounterMode(display=False) as counter:
            layer(x)
        assert counter.get_total_flops() == 2 * 64 * 96 * 384
        assert MIN_WORK > 2 * 96 * 384
        layer(x[:2])
        layer.double()(x.double())
        layer.float()
        with onednn_linear(False):
            layer(x)
        assert calls == []
        layer(x)
        assert calls == [(64, 96)]


def test_state_dict_is_nn_linears():
    torch.manual_seed(0)
    ours, plain = Linear(8, 16), nn.Linear(8, 16)
    assert ours.state_dict().keys() == plain.state_dict().keys()
    ours.load_state_dict(plain.state_dict())
    assert isinstance(ours, nn.Linear)
    x = torch.randn(4, 8)
    torch.testing.assert_close(ours(x), plain(x))


@needs_onednn
def test_default_follows_the_machine_and_the_variable(monkeypatch):
    monkeypatch.delenv("SELFFLOW_ONEDNN_LINEAR", raising=False)
    monkeypatch.setattr(linear_module.platform, "machine", lambda: "arm64")
    assert not linear_module._enabled_by_default()
    monkeypatch.setenv("SELFFLOW_ONEDNN_LINEAR", "1")
    assert linear_module._enabled_by_default()
    monkeypatch.setattr(linear_module.platform, "machine", lambda: "x86_64")
    monkeypatch.setenv("SELFFLOW_ONEDNN_LINEAR", "0")
    assert not linear_module._enabled_by_default()
    monkeypatch.delenv("SELFFLOW_ONEDNN_LINEAR")
    assert linear_module._enabled_by_default()


@needs_onednn
def test_cpu_kernels_names_the_path():
    assert linear_module.cpu_kernels() == "oneDNN"
    with onednn_linear(False):
        assert linear_module.cpu_kernels() == "F.linear"


def test_without_onednn_every_product_is_f_linear(monkeypatch):
    """A PyTorch built without oneDNN (or without the op) never reaches it, whatever the switch says."""
    monkeypatch.setattr(linear_module, "_onednn_available", lambda: False)
    monkeypatch.setenv("SELFFLOW_ONEDNN_LINEAR", "1")
    assert not linear_module._enabled_by_default()
    torch.manual_seed(0)
    layer = Linear(256, 1536)
    x = torch.randn(2, 64, 256)
    patch, calls = _counting()
    with patch, onednn_linear(True):
        assert linear_module.cpu_kernels() == "F.linear"
        out = layer(x)
    assert calls == []
    assert torch.equal(out, F.linear(x, layer.weight, layer.bias))


def test_compiled_layer_equals_eager():
    torch.manual_seed(0)
    layer = Linear(96, 384)
    x = torch.randn(2, 64, 96)
    torch.testing.assert_close(torch.compile(layer)(x), layer(x), rtol=1e-5, atol=1e-5)
