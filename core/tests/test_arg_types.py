import argparse

import pytest

from selfflow.core.arg_types import (
    ExamplesFormatter,
    device_name,
    finite_float,
    fraction,
    non_negative_int,
    positive_int,
)


def test_positive_int_and_finite_float_name_the_bad_value():
    assert positive_int("3") == 3 and finite_float("-0.5") == -0.5
    for bad in ("0", "-5", "2.5", "x"):
        with pytest.raises(argparse.ArgumentTypeError, match=f"got '{bad}'"):
            positive_int(bad)
    for bad in ("nan", "inf", "-inf", "x"):
        with pytest.raises(argparse.ArgumentTypeError, match=f"got '{bad}'"):
            finite_float(bad)


def test_seeds_and_fractions_are_range_checked():
    assert non_negative_int("0") == 0 and fraction("0.03") == 0.03
    for bad in ("-1", "1.5", "x"):  # numpy's generators refuse negative seeds, mid-way through a prepare
        with pytest.raises(argparse.ArgumentTypeError, match=f"must be an integer ≥ 0, got '{bad}'"):
            non_negative_int(bad)
    for bad in ("1", "-0.1", "nan"):
        with pytest.raises(argparse.ArgumentTypeError, match=f"got '{bad}'"):
            fraction(bad)


def test_help_shows_each_default_once():
    p = argparse.ArgumentParser(prog="x", formatter_class=ExamplesFormatter)
    p.add_argument("--batch-size", type=int, default=64, help="samples per forward")
    p.add_argument("--num", type=int, default=500, help="samples (default 500)")  # stated already
    p.add_argument("--levels", type=float, nargs="+", default=[0.0, 0.5], help="noise levels")
    p.add_argument("--set", action="append", default=[], help="override a key")  # empty: nothing to show
    p.add_argument("--out", help="output file")  # no default
    p.add_argument("--fast", action="store_true", help="go fast")
    p.add_argument("--png", action=argparse.BooleanOptionalAction, default=True, help="per-sample files")
    formatter = p._get_formatter()
    shown = {a.option_strings[0]: formatter._expand_help(a) for a in p._actions}
    assert shown["--batch-size"] == "samples per forward (default: 64)"
    assert shown["--num"] == "samples (default 500)"
    assert shown["--levels"] == "noise levels (default: [0.0, 0.5])"
    assert (shown["--set"], shown["--out"], shown["--fast"]) == ("override a key", "output file", "go fast")
    assert shown["--png"].count("default") == 1
    assert "samples per forward (default: 64)" in " ".join(p.format_help().split())


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
