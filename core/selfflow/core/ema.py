"""Exponential moving average of a model's weights — Self-Flow's teacher.

``ema ← decay·ema + (1 − decay)·θ`` for floating parameters (one fused ``_foreach`` call); buffers are
copied. The EMA is an ordinary module, so it shards, checkpoints and samples like the student.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def make_ema(model: nn.Module) -> nn.Module:
    """A frozen deep copy of ``model`` to hold the average, compiled where ``model`` is.

    ``copy.deepcopy`` drops what ``nn.Module.compile()`` set: a teacher copied from a model whose blocks were
    already compiled would run them eagerly (the first H200 run of ``make gpu-check`` did: docs/BENCHMARKS.md
    "On a GPU"). Each submodule compiled in ``model`` is compiled in the copy (``torch.compile``'s defaults).
    """
    ema = copy.deepcopy(model)
    ema.requires_grad_(False)
    ema.eval()
    for source, copied in zip(model.modules(), ema.modules(), strict=True):
        if is_compiled(source) and not is_compiled(copied):
            copied.compile()
    return ema


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module.compile()`` was called (torch keeps it in a private attribute, which deepcopy drops)."""
    return getattr(module, "_compiled_call_impl", None) is not None


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """One EMA step. ``decay = 0`` copies the model; ``decay = 1`` freezes the average."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must lie in [0, 1], got {decay}")
    ema_params, params = [], []
    for (name, e), (name2, p) in zip(ema.named_parameters(), model.named_parameters(), strict=True):
        if name != name2:
            raise ValueError(f"EMA and model parameters disagree: {name} vs {name2}")
        ema_params.append(e)
        params.append(p.detach())
    if ema_params:
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers(), strict=True):
        e.copy_(b)
