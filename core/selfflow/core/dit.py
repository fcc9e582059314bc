"""Per-token DiT (SiT family) with the module names of the official ``SelfFlowPerTokenDiT``.

The official ImageNet checkpoint is a SiT-XL/2 whose timestep conditioning is per token. This module keeps
its exact parameter names and shapes (``x_embedder.proj``, ``t_embedder.mlp``, ``y_embedder.embedding_table``,
``blocks.i.{attn.qkv, attn.proj, mlp.fc1, mlp.fc2, adaLN_modulation.1}``, ``final_layer.*``, ``projector.*``,
``pos_embed``), so that checkpoint loads with ``strict=True``, while computing every adaLN on the *distinct*
timesteps of each sample and gathering (:mod:`.modulation`) instead of a Linear per token.

Time: the API is RF (t = 0 data, output ``ε − x0``). With ``time_input="sit"`` (official Self-Flow, SiT) the
network embeds ``1 − t`` and its raw output is negated, exactly as the official forward does; with
``time_input="rf"`` (REPA-trained SiTs) ``t`` is embedded as is and the output is returned unchanged.

Blocks are numbered ``1 … depth`` for ``capture=`` / ``stop_after=``. Positions: a fixed 2-D sin-cos table of
``grid_size²`` rows, indexed by the ``(h, w)`` columns of ``ids`` (the ``t`` column is not used).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from einops import rearrange
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator
from torch import nn

from .attention import attention, resolve_backend
from .backbone_protocol import check_forward_inputs, embed_labels
from .block_walk import BlockWalk
from .linear import Linear
from .modulation import (
    TIME_EMBED_DIM,
    TokenTimesteps,
    gate_levels,
    modulate_levels,
    timestep_embedding,
)
from .presets import apply_preset
from .projector import (
    MLPProjector,
    Projector,
    init_projector,
    outside_projector,
    random_stream_apart,
)
from .tokens import Conditioning

PRESETS: dict[str, dict[str, Any]] = {
    # CPU tests and tiny runs.
    "tiny": dict(hidden_size=64, num_heads=4, depth=4),
    "S/2": dict(hidden_size=384, num_heads=6, depth=12),
    "B/2": dict(hidden_size=768, num_heads=12, depth=12),
    "L/2": dict(hidden_size=1024, num_heads=16, depth=24),
    # The official Self-Flow ImageNet model: SiT-XL/2, 28 blocks, 1152 wide, 16 heads.
    "XL/2": dict(hidden_size=1152, num_heads=16, depth=28),
}


class DiTConfig(BaseModel):
    """Hyper-parameters of :class:`DiT`; ``preset`` (S/2, B/2, L/2, XL/2, tiny) fills defaults."""

    model_config = ConfigDict(extra="forbid")

    arch: Literal["dit"] = "dit"
    preset: str | None = None
    hidden_size: int = Field(64, gt=0)
    num_heads: int = Field(4, gt=0)
    depth: int = Field(4, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    patch_size: int = Field(2, ge=1, description="spatial patch; token channels = latent channels · p²")
    grid_size: int = Field(16, ge=1, description="tokens per side of the position table (256 px SD-VAE: 16)")
    learn_sigma: bool = Field(True, description="output 2× channels and drop the second half (DiT/SiT legacy)")
    time_input: Literal["sit", "rf"] = Field("sit", description="sit: embed 1 − t and negate (official)")
    num_classes: int = Field(0, ge=0, description="class labels (0: none); id num_classes is the null label")
    projector_mult: float = Field(2.0, ge=0, description="Self-Flow projector hidden = mult·hidden (0: none)")
    projector_dims: tuple[PositiveInt, ...] = Field(
        (), description="REPA-style MLP projector dims (hidden…, out), e.g. [2048, 2048, 768]; () = Self-Flow")
    attention: str = "auto"
    modalities: dict[str, int] = Field(default_factory=dict, description="modality → token channels")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        return apply_preset(data, PRESETS, "DiT preset")

    @model_validator(mode="after")
    def _check(self) -> DiTConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.hidden_size % 4:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by 4 (2-D sin-cos positions)")
        if len(self.modalities) > 1:
            raise ValueError(f"the DiT has one input projection; got modalities {sorted(self.modalities)}")
        return self

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """``(grid², dim)`` fixed positions, rows row-major over the grid. The first half encodes the column
    (w), the second the row (h); each half is ``[sin(p·ω), cos(p·ω)]`` with ``ω_k = 10000^(−k/(dim/4))``
    (the DiT/SiT/MAE table, float64 then cast)."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64),
                                torch.arange(grid, dtype=torch.float64), indexing="ij")

    def axis(p: torch.Tensor) -> torch.Tensor:
        out = p.reshape(-1, 1) * omega
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([axis(cols), axis(rows)], dim=1).float()


class PatchEmbed(nn.Module):
    """Pre-patchified tokens ``(B, L, C)`` → ``(B, L, D)`` (a conv patch embed flattened to a Linear)."""

    def __init__(self, channels: int, dim: int):
        super().__init__()
        self.proj = Linear(channels, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of t in [0, 1] (no ×1000, as SiT) → MLP."""

    def __init__(self, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(Linear(TIME_EMBED_DIM, dim), nn.SiLU(), Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(t, TIME_EMBED_DIM, time_factor=1.0)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)  # last row: the null label

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return embed_labels(self.embedding_table, labels)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = Linear(dim, 3 * dim)
        self.proj = Linear(dim, dim)

    def forward(self, x: torch.Tensor, backend: str) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b l (three h d) -> three b h l d", three=3, h=self.heads)
        return self.proj(attention(q, k, v, None, backend))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """adaLN-Zero block; its six modulation vectors come from the per-level conditioning ``c (B, K, D)``."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, mlp_hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, index: torch.Tensor | None, backend: str) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)  # 6 × (B, K, D)
        x = gate_levels(x, gate1, self.attn(modulate_levels(self.norm1(x), shift1, scale1, index), backend), index)
        return gate_levels(x, gate2, self.mlp(modulate_levels(self.norm2(x), shift2, scale2, index)), index)


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = Linear(dim, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)  # 2 × (B, K, D)
        return self.linear(modulate_levels(self.norm_final(x), shift, scale, index))


class BlockList(nn.ModuleList):
    """The blocks under the official name ``blocks.i``; calling it, ``model.blocks()``, gives the list the
    backbone API asks for (units of FSDP2 sharding, compile and activation checkpointing)."""

    def forward(self) -> list[nn.Module]:
        return list(self)


class DiT(nn.Module):
    """``forward(x, ids, t, cond, *, modality, capture, stop_after, project)`` → RF velocity ``(B, L, C)``.

    The :class:`~.backbone_protocol.Backbone` contract; ``cond`` may also be a labels tensor ``(B,)``
    (so ``model(x, ids, t, labels)`` mirrors the official ``forward(x, timesteps=t, vector=labels)``).
    """

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        if not cfg.modalities:
            raise ValueError("DiTConfig.modalities is empty: name the modality and its token channels")
        self.cfg = cfg
        d, p = cfg.hidden_size, cfg.patch_size
        self.channels = next(iter(cfg.modalities.values()))
        if self.channels % (p * p):
            raise ValueError(f"token channels {self.channels} are not divisible by patch_size² = {p * p}")
        self.latent_channels = self.channels // (p * p)
        out = self.channels * (2 if cfg.learn_sigma else 1)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid_size**2, d), requires_grad=False)
        self.x_embedder = PatchEmbed(self.channels, d)
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = LabelEmbedder(cfg.num_classes, d) if cfg.num_classes else None
        self.blocks = BlockList(DiTBlock(d, cfg.num_heads, cfg.mlp_hidden) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(d, out)
        self.projector: nn.Module | None = None
        with random_stream_apart():  # the rest of the weights draw alike with or without a projector
            if cfg.projector_dims:
                self.projector = MLPProjector(d, cfg.projector_dims)
            elif cfg.projector_mult:
                self.projector = Projector(d, int(d * cfg.projector_mult))
        self.activation_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DiT init: Xavier linears, N(0, 0.02) embeddings, zero adaLN and output (blocks start as identity)."""
        for m in outside_projector(self, self.projector):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        init_projector(self.projector)
        with torch.no_grad():
            self.pos_embed.copy_(sincos_pos_embed_2d(self.cfg.hidden_size, self.cfg.grid_size)[None])
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in (*(b.adaLN_modulation[1] for b in self.blocks), self.final_layer.adaLN_modulation[1],
                      self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @property
    def depth(self) -> int:
        return self.cfg.depth

    @property
    def null_label(self) -> int:
        return self.cfg.num_classes

    def forward_flops(self, n_data: int, n_context: int = 0, upto: int | None = None) -> float:
        return dit_forward_flops(self.cfg, n_data, upto, self.channels)

    def condition_vector(self, tt: TokenTimesteps, labels: torch.Tensor | None) -> torch.Tensor:
        """``c (B, K, D)``: embedding of each distinct level plus the label embedding."""
        levels = 1 - tt.values if self.cfg.time_input == "sit" else tt.values
        c = self.t_embedder(levels)
        if self.y_embedder is not None:
            if labels is None:
                raise ValueError("this model is class-conditional: pass labels (the null label is "
                                 f"{self.null_label})")
            c = c + self.y_embedder(labels)[:, None]
        return c

    def check_positions(self, ids: torch.Tensor, modality: str) -> None:
        """Refuse a token layout ``ids (B, L, 3)`` that the 2-D ``(h, w)`` position table cannot tell apart:
        tokens along a time axis (video frames or audio would share positions: a model blind to order that
        trains without a word) or a grid larger than ``grid_size`` (an index past the table)."""
        if bool((ids[..., 0] != 0).any()):
            raise ValueError(f"model.arch dit has a 2-D (h, w) position table, but modality {modality!r} places its "
                             "tokens along a time axis (frames, audio), where they would share positions: use "
                             "model.arch: mmdit (3-D RoPE)")
        rows, cols = int(ids[..., 1].max()) + 1, int(ids[..., 2].max()) + 1
        if max(rows, cols) > self.cfg.grid_size:
            raise ValueError(f"modality {modality!r} has a {rows}×{cols} token grid, larger than the DiT's position "
                             f"table (model.grid_size={self.cfg.grid_size}): set model.grid_size={max(rows, cols)}")

    def position_embedding(self, ids: torch.Tensor) -> torch.Tensor:
        g = self.cfg.grid_size
        pos = ids[..., 1].long() * g + ids[..., 2].long()  # (t, h, w[, l]) ids: row-major grid index
        return self.pos_embed[0][pos]  # (B, L, D)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, t: torch.Tensor | TokenTimesteps,
                cond: Conditioning | torch.Tensor | None = None, *, modality: str | None = None,
                capture: tuple[int, ...] = (), stop_after: int | None = None, project: bool = False):
        if isinstance(cond, torch.Tensor):
            cond = Conditioning(labels=cond)
        cond = cond or Conditioning()
        if modality is not None and modality not in self.cfg.modalities:
            raise KeyError(f"modality {modality!r} is not the one this DiT was built for "
                           f"({next(iter(self.cfg.modalities))!r})")
        check_forward_inputs(x, ids, t, cond.labels, modality=modality or next(iter(self.cfg.modalities)),
                             channels=self.channels, num_classes=self.cfg.num_classes)
        walk = BlockWalk(self, capture, stop_after, project)
        b, n, _ = x.shape
        tt = TokenTimesteps.coerce(t, b, n)
        backend = resolve_backend(self.cfg.attention, x.device)
        c = self.condition_vector(tt, cond.labels)
        h = self.x_embedder(x) + self.position_embedding(ids).to(x.dtype)
        for block in self.blocks:
            h = walk(block, h, c, tt.index, backend)
            if walk.finished(h):
                return walk.stopped()
        out = self.to_tokens(self.final_layer(h, c, tt.index))
        if self.cfg.time_input == "sit":
            out = -out
        return walk.output(out)

    def to_tokens(self, out: torch.Tensor) -> torch.Tensor:
        """Final-layer output, ordered ``(p, q, c)`` as DiT's unpatchify, → our ``(c, p, q)`` tokens; the
        learned-sigma half is dropped."""
        p = self.cfg.patch_size
        out = rearrange(out, "b l (p q c) -> b l c p q", p=p, q=p)[:, :, : self.latent_channels]
        return rearrange(out, "b l c p q -> b l (c p q)")


def dit_forward_flops(cfg: DiTConfig, n_data: int, upto: int | None = None, token_channels: int = 0) -> float:
    """Matmul FLOPs of one sample's forward through blocks ``1 … upto`` (all and the head if None), with the
    adaLN computed once per sample (one distinct level), as :class:`DiT` does."""
    d, h, n = cfg.hidden_size, cfg.mlp_hidden, n_data
    per_block = 2 * n * (4 * d * d + 2 * d * h) + 2 * 2 * n * n * d + 2 * 6 * d * d
    total = 2.0 * token_channels * d * n + 2.0 * (TIME_EMBED_DIM * d + d * d)  # patch embed, timestep MLP
    total += per_block * (cfg.depth if upto is None else upto)
    if upto is None:
        out = token_channels * (2 if cfg.learn_sigma else 1)
        total += 2.0 * d * out * n + 2.0 * d * 2 * d
    return total
