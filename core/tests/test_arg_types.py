import argparse

import pytest

from selfflow.core.arg_types import device_name, finite_float, positive_int


def test_positive_int_and_finite_float_name_the_bad_value():
    assert positive_int("3") == 3 and finite_float("-0.5") == -0.5
    for bad in ("0", "-5", "2.5", "x"):
        with pytest.raises(argparse.ArgumentTypeError, match=f"got '{bad}'"):
            positive_int(bad)
    for bad in ("nan", "inf", "-inf", "x"):
        with pytest.raises(argparse.ArgumentTypeError, match=f"got '{bad}'"):
            finite_float(bad)


def test_device_name_checks_cuda_exists(monkeypatch):
    assert device_name("cpu") == "cpu" and device_name("auto") == "auto"
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(argparse.ArgumentTypeError, match="'cuda:0' asked for, but no CUDA device"):
        device_name("cuda:0")
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    assert device_name("cuda:1") == "cuda:1"
    with pytest.raises(argparse.ArgumentTypeError, match="has 2 CUDA device"):
        device_name("cuda:2")
    with pytest.raises(argparse.ArgumentTypeError, match="got 'gpu'"):
        device_name("gpu")
