"""FLUX.2-style MMDiT shared by every modality, with per-token timestep modulation.

Double-stream blocks (data stream + context stream, joint attention) then single-stream blocks; QK
RMSNorm; SwiGLU MLPs; bias-free linears; 3D RoPE over ``(t, h, w)``; adaLN modulation shared across
blocks (as in FLUX.2) and computed on the distinct timesteps of each sample (:mod:`.modulation`).
Only the input and output projections are per modality. The blocks live in :mod:`.mmdit_blocks`.

Blocks are numbered ``1 … depth_double + depth_single`` (double blocks first), the numbering used by
``capture=`` / ``stop_after=`` and by the Self-Flow student/teacher layers.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from .attention import resolve_backend
from .backbone_protocol import check_forward_inputs, embed_labels
from .block_walk import BlockWalk
from .linear import Linear
from .mmdit_blocks import DoubleStreamBlock, FinalLayer, Modulation, SingleStreamBlock
from .modulation import TIME_EMBED_DIM, TokenTimesteps, timestep_embedding
from .presets import apply_preset
from .projector import Projector, init_projector, outside_projector, random_stream_apart
from .rope import rope_cos_sin
from .tokens import Conditioning

PRESETS: dict[str, dict[str, Any]] = {
    # ~1.3M: CPU experiments and tests.
    "tiny": dict(hidden_size=128, num_heads=4, depth_double=2, depth_single=4, axes_dim=(8, 12, 12)),
    # ~30M.
    "small": dict(hidden_size=384, num_heads=6, depth_double=2, depth_single=8, axes_dim=(16, 24, 24)),
    # ~B-sized (DiT-B: hidden 768, 12 heads, 12 blocks).
    "base": dict(hidden_size=768, num_heads=12, depth_double=4, depth_single=8, axes_dim=(16, 24, 24)),
    # The paper's backbone: hidden 1152, 16 heads, mlp_ratio 4, 7 double + 14 single, RoPE 24/24/24.
    "paper625m": dict(hidden_size=1152, num_heads=16, depth_double=7, depth_single=14,
                      axes_dim=(24, 24, 24), context_dim=4096),
}


class MMDiTConfig(BaseModel):
    """Hyper-parameters of :class:`MMDiT`. ``preset`` fills defaults; explicit keys override it."""

    model_config = ConfigDict(extra="forbid")

    arch: Literal["mmdit"] = "mmdit"
    preset: str | None = None
    hidden_size: int = Field(128, gt=0)
    num_heads: int = Field(4, gt=0)
    mlp_ratio: float = Field(4.0, gt=0)
    depth_double: int = Field(2, ge=0)
    depth_single: int = Field(4, ge=0)
    axes_dim: tuple[int, int, int] = (8, 12, 12)
    rope_theta: float = Field(2000.0, gt=0, description="RoPE base: axis channel pair i turns by "
                              "theta^(-2i/axes_dim) per position (FLUX.2: 2000, this default; FLUX.1: 10000)")
    num_classes: int = Field(0, ge=0, description="class labels (0: none); id num_classes is the null label")
    class_token: bool = Field(False, description="also feed the label as one context token (joint attention), "
                              "besides the shared modulation")
    context_dim: int = Field(0, ge=0, description="text-embedding width (0: no context stream)")
    projector_mult: float = Field(2.0, ge=0, description="projector hidden = mult·hidden (0: no projector)")
    attention: str = "auto"
    modalities: dict[str, int] = Field(default_factory=dict, description="modality → token channels")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        return apply_preset(data, PRESETS, "model preset")

    @model_validator(mode="after")
    def _check(self) -> MMDiTConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        head_dim = self.hidden_size // self.num_heads
        if sum(self.axes_dim) != head_dim:
            raise ValueError(f"axes_dim {self.axes_dim} must sum to the head dim {head_dim}")
        if self.depth_double + self.depth_single == 0:
            raise ValueError("the model needs at least one block")
        return self

    @property
    def has_context_stream(self) -> bool:
        """Whether the double blocks carry a context stream (text tokens and/or the class token)."""
        return bool(self.context_dim) or self.class_token

    @property
    def depth(self) -> int:
        return self.depth_double + self.depth_single

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


class MMDiT(nn.Module):
    """``forward(x, ids, t, cond, *, modality, capture, stop_after, project)`` → velocity ``(B, L, C)``
    (the :class:`~.backbone_protocol.Backbone` contract).

    ``t`` is ``(B,)``, ``(B, L)`` or a :class:`TokenTimesteps`, in RF time (t=0 data, t=1 noise); the
    output is the RF velocity ``ε − x0``. With ``capture=(k, …)`` it returns ``(velocity, {k: (B, L, D)})``,
    the data-token hidden states after block ``k``; ``project=True`` passes them through the Self-Flow
    projector (inside ``forward``, so DDP/FSDP see it); ``stop_after=k`` ends the forward there (velocity
    is then ``None``).
    """

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        if not cfg.modalities:
            raise ValueError("MMDiTConfig.modalities is empty: name at least one modality and its channels")
        if cfg.class_token and not cfg.num_classes:
            raise ValueError("model.class_token needs a class-conditional modality (num_classes > 0)")
        self.cfg = cfg
        d = cfg.hidden_size
        self.img_in = nn.ModuleDict({m: Linear(c, d, bias=False) for m, c in cfg.modalities.items()})
        self.time_in = nn.Sequential(Linear(TIME_EMBED_DIM, d, bias=False), nn.SiLU(),
                                     Linear(d, d, bias=False))
        self.label_embed = nn.Embedding(cfg.num_classes + 1, d) if cfg.num_classes else None
        self.txt_in = Linear(cfg.context_dim, d, bias=False) if cfg.context_dim else None
        # FLUX.2 shares one modulation across all blocks, so a label that only shifts that modulation is a
        # narrow pathway; as a context token every data token can also attend to it.
        self.class_token_embed = nn.Embedding(cfg.num_classes + 1, d) if cfg.class_token else None
        has_ctx = cfg.has_context_stream
        self.double_mod_img = Modulation(d, 2) if cfg.depth_double else None
        self.double_mod_txt = Modulation(d, 2) if cfg.depth_double and has_ctx else None
        self.single_mod = Modulation(d, 1) if cfg.depth_single else None
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(d, cfg.num_heads, cfg.mlp_hidden, has_ctx) for _ in range(cfg.depth_double))
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(d, cfg.num_heads, cfg.mlp_hidden) for _ in range(cfg.depth_single))
        self.final = nn.ModuleDict({m: FinalLayer(d, c) for m, c in cfg.modalities.items()})
        with random_stream_apart():  # the rest of the weights draw alike with or without a projector
            self.projector = Projector(d, int(d * cfg.projector_mult)) if cfg.projector_mult else None
        self.activation_checkpointing = False  # recompute each block in backward (set by the trainer)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier linears; zero modulation and output layers so every block starts as the identity."""
        for m in outside_projector(self, self.projector):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        init_projector(self.projector)
        for mod in (self.double_mod_img, self.double_mod_txt, self.single_mod):
            if mod is not None:
                nn.init.zeros_(mod.lin.weight)
        for fin in self.final.values():
            nn.init.zeros_(fin.adaLN_modulation[1].weight)
            nn.init.zeros_(fin.linear.weight)
        nn.init.normal_(self.time_in[0].weight, std=0.02)
        nn.init.normal_(self.time_in[2].weight, std=0.02)
        for emb in (self.label_embed, self.class_token_embed):
            if emb is not None:
                nn.init.normal_(emb.weight, std=0.02)

    @property
    def depth(self) -> int:
        return self.cfg.depth

    def blocks(self) -> list[nn.Module]:
        """Transformer blocks in forward order (units of FSDP2 sharding, compile and checkpointing)."""
        return [*self.double_blocks, *self.single_blocks]

    def forward_flops(self, n_data: int, n_context: int = 0, upto: int | None = None) -> float:
        return mmdit_forward_flops(self.cfg, n_data, n_context, upto, token_channels=max(self.cfg.modalities.values()))

    @property
    def null_label(self) -> int:
        return self.cfg.num_classes

    def condition_vector(self, tt: TokenTimesteps, labels: torch.Tensor | None) -> torch.Tensor:
        """``(B, K, D)``: timestep embedding of each distinct level plus the label embedding."""
        vec = self.time_in(timestep_embedding(tt.values, TIME_EMBED_DIM).to(self.time_in[0].weight.dtype))
        if self.label_embed is not None:
            if labels is None:
                raise ValueError("this model is class-conditional: pass cond.labels (use the null label "
                                 f"{self.null_label} for unconditional)")
            vec = vec + embed_labels(self.label_embed, labels)[:, None]
        return vec

    def forward(self, x: torch.Tensor, ids: torch.Tensor, t: torch.Tensor | TokenTimesteps,
                cond: Conditioning | None = None, *, modality: str | None = None,
                capture: tuple[int, ...] = (), stop_after: int | None = None, project: bool = False):
        cond = cond or Conditioning()
        modality = modality or next(iter(self.cfg.modalities))
        if modality not in self.img_in:
            raise KeyError(f"modality {modality!r} has no projections in this model "
                           f"(known: {sorted(self.img_in)})")
        check_forward_inputs(x, ids, t, cond.labels, modality=modality, channels=self.cfg.modalities[modality],
                             num_classes=self.cfg.num_classes)
        walk = BlockWalk(self, capture, stop_after, project)
        b, n_img, _ = x.shape
        ids = ids.expand(b, -1, -1)  # ids of batch 1 are shared by the batch (as the DiT accepts)
        tt = TokenTimesteps.coerce(t, b, n_img)
        backend = resolve_backend(self.cfg.attention, x.device)
        vec = self.condition_vector(tt, cond.labels)  # (B, K, D)
        img = self.img_in[modality](x)

        txt, n_txt, context_mask = None, 0, cond.context_mask
        if self.txt_in is not None:
            if cond.context is None:
                raise ValueError("this model has a context stream: pass cond.context (B, Lc, context_dim)")
            txt = self.txt_in(cond.context.to(img.dtype))
        if self.class_token_embed is not None:
            cls = self.class_token_embed(cond.labels)[:, None].to(img.dtype)  # (B, 1, D)
            txt = cls if txt is None else torch.cat([cls, txt], 1)
            if context_mask is not None:
                context_mask = torch.cat([context_mask.new_ones(b, 1), context_mask], 1)
        if txt is not None:
            n_txt = txt.shape[1]
        # Context tokens are modulated with the token-average conditioning vector of their sample; with a
        # single level that is the sample's vector itself.
        if tt.index is None:
            vec_all, idx_img, idx_all, txt_vec = vec, None, None, vec
        else:
            weights = tt.counts() / n_img  # (B, K)
            txt_vec = (weights.unsqueeze(-1).to(vec.dtype) * vec).sum(1, keepdim=True)  # (B, 1, D)
            vec_all = torch.cat([vec, txt_vec], 1)  # level K = context
            idx_img = tt.index
            idx_all = torch.cat([idx_img.new_full((b, n_txt), vec.shape[1]), idx_img], 1)

        txt_ids = torch.zeros(b, n_txt, ids.shape[-1], dtype=ids.dtype, device=ids.device)
        rope = rope_cos_sin(torch.cat([txt_ids, ids], 1), self.cfg.axes_dim, self.cfg.rope_theta)
        mask = None
        if context_mask is not None and n_txt:
            keep = torch.cat([context_mask.bool(), context_mask.new_ones(b, n_img, dtype=torch.bool)], 1)
            mask = keep[:, None, None, :]  # (B, 1, 1, Lc + L)

        if self.double_blocks:
            # per level (B, K, D): each block selects the tokens' levels inside itself (and inside its compiled
            # graph, where the backward's per-level sums join the kernels that make the gradients)
            img_mod = self.double_mod_img(vec).chunk(6, dim=-1)
            txt_mod = (list(self.double_mod_txt(txt_vec).chunk(6, dim=-1))
                       if self.double_mod_txt is not None else None)
            for block in self.double_blocks:
                img, txt = walk(block, img, txt, img_mod, idx_img, txt_mod, rope, mask, backend)
                if walk.finished(img):
                    return walk.stopped()
        if self.single_blocks:
            single_mod = self.single_mod(vec_all).chunk(3, dim=-1)
            h = img if txt is None else torch.cat([txt, img], 1)  # (B, Lc + L, D)
            for block in self.single_blocks:
                h = walk(block, h, single_mod, idx_all, rope, mask, backend)
                if walk.finished(h, n_txt):
                    return walk.stopped()
            img = h[:, n_txt:]
        return walk.output(self.final[modality](img, vec, idx_img))


def mmdit_forward_flops(cfg: MMDiTConfig, n_data: int, n_context: int = 0, upto: int | None = None,
                        token_channels: int = 0) -> float:
    """Matmul FLOPs of one sample's forward through blocks ``1 … upto`` (all blocks and the heads if None);
    norms and elementwise ops are a few percent and left out, as is customary for MFU."""
    d, h = cfg.hidden_size, cfg.mlp_hidden
    n_context += int(cfg.class_token)  # the label's context token
    n = n_data + n_context
    stream = 3 * d * d + d * d + 2 * h * d + h * d  # qkv, proj, SwiGLU in + out
    single = d * (3 * d + 2 * h) + (d + h) * d
    attn = 2 * 2 * n * n * d  # QKᵀ and AV
    total = 2.0 * token_channels * d * n_data  # input projection
    blocks = cfg.depth if upto is None else upto
    for b in range(1, blocks + 1):
        if b <= cfg.depth_double:
            total += 2 * stream * n_data + 2 * stream * n_context + attn
        else:
            total += 2 * single * n + attn
    if upto is None:
        total += 2.0 * d * token_channels * n_data + 2.0 * d * 2 * d  # output head + its modulation
    return total
