"""Backbone registry: ``model.arch`` in a run config → config class and module class.

A backbone is an ``nn.Module`` with the API of :class:`~selfflow.core.mmdit.MMDiT`:

- ``forward(x, ids, t, cond, *, modality, capture=(), stop_after=None, project=False)``;
- ``blocks()`` → the list of transformer blocks (the unit of FSDP2 sharding, compile and activation
  checkpointing), an ``activation_checkpointing`` attribute, ``depth``, ``null_label``, ``projector``;
- ``forward_flops(n_data, n_context=0, upto=None)`` → analytic FLOPs of one sample's forward.

Its config is a pydantic model with a literal ``arch`` field, ``depth``, ``modalities``, ``num_classes``
and ``projector_mult`` (the trainer fills the last three from the modality and the objective).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .dit import DiT, DiTConfig
from .mmdit import MMDiT, MMDiTConfig

BACKBONES: dict[str, tuple[type, type[nn.Module]]] = {"mmdit": (MMDiTConfig, MMDiT), "dit": (DiTConfig, DiT)}


def register_backbone(arch: str, config_cls: type, module_cls: type[nn.Module]) -> None:
    BACKBONES[arch] = (config_cls, module_cls)


def build_backbone(cfg: Any) -> nn.Module:
    try:
        _, module_cls = BACKBONES[cfg.arch]
    except KeyError:
        raise ValueError(f"unknown model.arch {cfg.arch!r}; known: {sorted(BACKBONES)}") from None
    return module_cls(cfg)


def count_parameters(cfg: Any) -> int:
    """Parameters of the backbone ``cfg`` describes (fixed tables included), counted on the meta device."""
    with torch.device("meta"):
        model = build_backbone(cfg)
    return sum(p.numel() for p in model.parameters())
