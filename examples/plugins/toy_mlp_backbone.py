"""A backbone plug-in that lives outside core: a per-token residual MLP, registered as ``model.arch: toy_mlp``.

It shows the whole contract of :class:`selfflow.core.backbone_protocol.Backbone` in a few lines and reuses
core's shared parts (the capture / early-exit / projection walk and the Self-Flow projector). A package
exposes it with an entry point, e.g. in its ``pyproject.toml``::

    [project.entry-points."selfflow.backbones"]
    toy_mlp = "toy_mlp_backbone:SPEC"

after which ``model: {arch: toy_mlp, hidden_size: 64, depth: 4}`` in a run config validates against
:class:`ToyMLPConfig` and trains with any objective. Tokens do not mix (no attention): a demonstration,
not a model to use.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from selfflow.core.backbones import BackboneSpec
from selfflow.core.block_walk import BlockWalk
from selfflow.core.modulation import TIME_EMBED_DIM, TokenTimesteps, timestep_embedding
from selfflow.core.projector import Projector
from selfflow.core.tokens import Conditioning


class ToyMLPConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    arch: Literal["toy_mlp"] = "toy_mlp"
    hidden_size: int = Field(64, gt=0)
    # 4: Self-Flow's default layers (0.3 / 0.7 of the depth) are then blocks 1 and 3; at depth 2 both would be 1
    depth: int = Field(4, ge=1)
    num_classes: int = Field(0, ge=0, description="class labels (0: none); id num_classes is the null label")
    projector_mult: float = Field(2.0, ge=0, description="projector hidden = mult·hidden (0: no projector)")
    modalities: dict[str, int] = Field(default_factory=dict, description="modality → token channels")


class ResidualMLP(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(nn.functional.silu(self.fc1(self.norm(h))))


class ToyMLP(nn.Module):
    def __init__(self, cfg: ToyMLPConfig):
        super().__init__()
        if len(cfg.modalities) != 1:
            raise ValueError(f"toy_mlp takes exactly one modality, got {sorted(cfg.modalities)}")
        self.cfg = cfg
        d, channels = cfg.hidden_size, next(iter(cfg.modalities.values()))
        self.x_in = nn.Linear(channels, d)
        self.time_in = nn.Linear(TIME_EMBED_DIM, d)
        self.label_embed = nn.Embedding(cfg.num_classes + 1, d) if cfg.num_classes else None
        self.mlp_blocks = nn.ModuleList(ResidualMLP(d) for _ in range(cfg.depth))
        self.out = nn.Linear(d, channels)
        self.projector = Projector(d, int(d * cfg.projector_mult)) if cfg.projector_mult else None
        self.activation_checkpointing = False

    @property
    def depth(self) -> int:
        return self.cfg.depth

    @property
    def null_label(self) -> int:
        return self.cfg.num_classes

    def blocks(self) -> list[nn.Module]:
        return list(self.mlp_blocks)

    def forward_flops(self, n_data: int, n_context: int = 0, upto: int | None = None) -> float:
        d, c = self.cfg.hidden_size, next(iter(self.cfg.modalities.values()))
        embed = 2.0 * n_data * (c * d + TIME_EMBED_DIM * d)
        blocks = 2.0 * n_data * 8 * d * d * (self.depth if upto is None else upto)
        return embed + blocks + (2.0 * n_data * d * c if upto is None else 0.0)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, t: torch.Tensor | TokenTimesteps,
                cond: Conditioning | None = None, *, modality: str | None = None,
                capture: tuple[int, ...] = (), stop_after: int | None = None, project: bool = False):
        cond = cond or Conditioning()
        walk = BlockWalk(self, capture, stop_after, project)
        b, n, _ = x.shape
        t_tokens = TokenTimesteps.coerce(t, b, n).dense()  # (B, L)
        h = self.x_in(x) + self.time_in(timestep_embedding(t_tokens, TIME_EMBED_DIM))  # (B, L, D)
        if self.label_embed is not None:
            h = h + self.label_embed(cond.labels)[:, None]
        for block in self.mlp_blocks:
            h = walk(block, h)
            if walk.finished(h):
                return walk.stopped()
        return walk.output(self.out(h))


SPEC = BackboneSpec(ToyMLPConfig, ToyMLP)
