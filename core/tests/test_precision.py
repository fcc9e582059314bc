import warnings

import pytest
import torch

from selfflow.core import precision
from selfflow.core.config import load_config
from selfflow.core.precision import SLOW_CPU_BF16, autocast, cpu_bf16_is_native, warn_if_slow

from .test_trainer import TINY


def test_cpu_bf16_is_native_reads_the_cpu_flags(monkeypatch):
    assert isinstance(cpu_bf16_is_native(), bool)
    for flags, native in [({"avx512_bf16": True}, True), ({"amx_bf16": True, "avx512_bf16": False}, True),
                          ({"avx512_bf16": False, "amx_bf16": False}, False), ({}, False)]:
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda flags=flags: flags, raising=False)
        assert cpu_bf16_is_native() is native
    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)  # an older torch: its private checks
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert cpu_bf16_is_native() is True


@pytest.mark.parametrize("native", [True, False])
def test_bf16_warns_only_on_a_cpu_without_native_bf16_once_per_process(monkeypatch, native):
    """Once: a bf16 run on such a CPU said it in training, then again in each preview's sampler."""
    monkeypatch.setattr(precision, "cpu_bf16_is_native", lambda: native)
    monkeypatch.setattr(precision, "_said_slow", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_if_slow("fp32", "cpu")
        warn_if_slow("bf16", "cuda")  # the GPU recipe: never
        with autocast("bf16", "cpu"):
            assert torch.is_autocast_enabled("cpu")
        warn_if_slow("bf16", "cpu")
    assert [str(w.message) for w in caught] == ([] if native else [SLOW_CPU_BF16])
    assert all(w.filename == __file__ for w in caught)  # the warning points at the caller's line


def test_autocast_fp32_is_nothing_and_other_precisions_are_refused():
    with autocast("fp32", "cpu"):
        assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError, match="fp16"), autocast("fp16", "cpu"):
        pass


def test_trainer_in_bf16_on_a_slow_cpu_warns(monkeypatch, tmp_path):
    from selfflow.core.trainer import Trainer

    monkeypatch.setattr(precision, "cpu_bf16_is_native", lambda: False)
    monkeypatch.setattr(precision, "_said_slow", False)  # said once per process: maybe already, by another test
    cfg = load_config(None, [*TINY, f"output_dir={tmp_path}", "name=bf16", "train.steps=1", "train.device=cpu",
                             "train.precision=bf16"])
    with pytest.warns(UserWarning, match="bf16 on this CPU"):
        Trainer(cfg, resume=False, progress=False)
