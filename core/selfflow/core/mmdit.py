"""FLUX.2-style MMDiT shared by every modality, with per-token timestep modulation.

Double-stream blocks (data stream + context stream, joint attention) then single-stream blocks; QK
RMSNorm; SwiGLU MLPs; bias-free linears; 3D RoPE over ``(t, h, w)``; adaLN modulation shared across
blocks (as in FLUX.2) and computed on the distinct timesteps of each sample (:mod:`.modulation`).
Only the input and output projections are per modality.

Blocks are numbered ``1 … depth_double + depth_single`` (double blocks first), the numbering used by
``capture=`` / ``stop_after=`` and by the Self-Flow student/teacher layers.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import attention, resolve_backend
from .modulation import TokenTimesteps, gather_levels, timestep_embedding
from .rope import apply_rope, rope_cos_sin
from .tokens import Conditioning

TIME_EMBED_DIM = 256

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


def apply_preset(data: Any, presets: dict[str, dict[str, Any]], what: str) -> Any:
    """Fill a raw config dict from ``presets[data["preset"]]``; keys given explicitly win."""
    if isinstance(data, dict) and data.get("preset") is not None:
        name = data["preset"]
        if not isinstance(name, str):
            raise ValueError(f"{what} must be a name, one of {sorted(presets)} (got {name!r})")
        if name not in presets:
            raise ValueError(f"unknown {what} {name!r}; choose one of {sorted(presets)}")
        data = {**presets[name], **data}
    return data


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
    rope_theta: float = Field(10000.0, gt=0)
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


class QKNorm(nn.Module):
    """RMSNorm of queries and keys per head (learned scale), for stable attention logits."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.query_norm = nn.RMSNorm(head_dim, eps=1e-6)
        self.key_norm = nn.RMSNorm(head_dim, eps=1e-6)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.query_norm(q), self.key_norm(k)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w_in = nn.Linear(dim, 2 * hidden, bias=False)
        self.w_out = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w_in(x).chunk(2, dim=-1)
        return self.w_out(nn.functional.silu(a) * b)


class StreamAttention(nn.Module):
    """The per-stream half of joint attention: qkv projection with QK norm, and the output projection."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.norm = QKNorm(dim // heads)
        self.proj = nn.Linear(dim, dim, bias=False)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, seq, _ = x.shape
        q, k, v = self.qkv(x).view(b, seq, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # 3 × (B, H, L, Dh)
        q, k = self.norm(q, k)
        return q, k, v


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class DoubleStreamBlock(nn.Module):
    """Separate weights for the data and context streams, one attention over both."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int, has_context: bool):
        super().__init__()
        self.img_norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.img_attn = StreamAttention(dim, heads)
        self.img_norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.img_mlp = SwiGLU(dim, mlp_hidden)
        self.has_context = has_context
        if has_context:
            self.txt_norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.txt_attn = StreamAttention(dim, heads)
            self.txt_norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.txt_mlp = SwiGLU(dim, mlp_hidden)

    def forward(self, img: torch.Tensor, txt: torch.Tensor | None, img_mod: list[torch.Tensor],
                txt_mod: list[torch.Tensor] | None, rope: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor | None, backend: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        shift1, scale1, gate1, shift2, scale2, gate2 = img_mod
        q, k, v = self.img_attn.qkv_heads(modulate(self.img_norm1(img), shift1, scale1))
        n_txt = 0
        if txt is not None:
            t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = txt_mod
            tq, tk, tv = self.txt_attn.qkv_heads(modulate(self.txt_norm1(txt), t_shift1, t_scale1))
            q, k, v = torch.cat([tq, q], 2), torch.cat([tk, k], 2), torch.cat([tv, v], 2)
            n_txt = txt.shape[1]
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = attention(q, k, v, mask, backend)
        txt_out, img_out = out[:, :n_txt], out[:, n_txt:]
        img = img + gate1 * self.img_attn.proj(img_out)
        img = img + gate2 * self.img_mlp(modulate(self.img_norm2(img), shift2, scale2))
        if txt is not None:
            txt = txt + t_gate1 * self.txt_attn.proj(txt_out)
            txt = txt + t_gate2 * self.txt_mlp(modulate(self.txt_norm2(txt), t_shift2, t_scale2))
        return img, txt


class SingleStreamBlock(nn.Module):
    """One set of weights over the concatenated ``[context; data]`` sequence; attention ∥ MLP."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int):
        super().__init__()
        self.heads, self.dim, self.mlp_hidden = heads, dim, mlp_hidden
        self.pre_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear1 = nn.Linear(dim, 3 * dim + 2 * mlp_hidden, bias=False)
        self.norm = QKNorm(dim // heads)
        self.linear2 = nn.Linear(dim + mlp_hidden, dim, bias=False)

    def forward(self, x: torch.Tensor, mod: list[torch.Tensor], rope: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor | None, backend: str) -> torch.Tensor:
        shift, scale, gate = mod
        b, seq, _ = x.shape
        qkv, mlp_in = self.linear1(modulate(self.pre_norm(x), shift, scale)).split(
            [3 * self.dim, 2 * self.mlp_hidden], dim=-1)
        q, k, v = qkv.view(b, seq, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k = self.norm(q, k)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        a, g = mlp_in.chunk(2, dim=-1)
        out = torch.cat([attention(q, k, v, mask, backend), nn.functional.silu(a) * g], dim=-1)
        return x + gate * self.linear2(out)


class Modulation(nn.Module):
    """``n`` (shift, scale, gate) triples from the conditioning vector, shared by every block."""

    def __init__(self, dim: int, n: int):
        super().__init__()
        self.n = n
        self.lin = nn.Linear(dim, 3 * n * dim, bias=False)

    def forward(self, vec: torch.Tensor) -> torch.Tensor:
        return self.lin(nn.functional.silu(vec))  # (B, K, 3·n·D)


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim, bias=False))
        self.linear = nn.Linear(dim, out_channels, bias=False)

    def forward(self, x: torch.Tensor, vec: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        shift, scale = gather_levels(self.adaLN_modulation(vec), index).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class Projector(nn.Module):
    """Self-Flow's head from student features to the teacher's space: Linear → SiLU → Linear."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.linear1 = nn.Linear(dim, hidden)
        self.linear2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(nn.functional.silu(self.linear1(x)))


class MMDiT(nn.Module):
    """``forward(x, ids, t, cond, *, modality, capture, stop_after)`` → velocity ``(B, L, C)``.

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
        self.img_in = nn.ModuleDict({m: nn.Linear(c, d, bias=False) for m, c in cfg.modalities.items()})
        self.time_in = nn.Sequential(nn.Linear(TIME_EMBED_DIM, d, bias=False), nn.SiLU(),
                                     nn.Linear(d, d, bias=False))
        self.label_embed = nn.Embedding(cfg.num_classes + 1, d) if cfg.num_classes else None
        self.txt_in = nn.Linear(cfg.context_dim, d, bias=False) if cfg.context_dim else None
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
        self.projector = Projector(d, int(d * cfg.projector_mult)) if cfg.projector_mult else None
        self.activation_checkpointing = False  # recompute each block in backward (set by the trainer)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier linears; zero modulation and output layers so every block starts as the identity."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
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
        from .flops import mmdit_forward_flops

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
            vec = vec + self.label_embed(labels)[:, None]
        return vec

    def forward(self, x: torch.Tensor, ids: torch.Tensor, t: torch.Tensor | TokenTimesteps,
                cond: Conditioning | None = None, *, modality: str | None = None,
                capture: tuple[int, ...] = (), stop_after: int | None = None, project: bool = False):
        cond = cond or Conditioning()
        modality = modality or next(iter(self.cfg.modalities))
        if modality not in self.img_in:
            raise KeyError(f"modality {modality!r} has no projections in this model "
                           f"(known: {sorted(self.img_in)})")
        for k in (*capture, *(() if stop_after is None else (stop_after,))):
            if not 1 <= k <= self.depth:
                raise ValueError(f"block {k} is out of range 1..{self.depth}")
        b, n_img, _ = x.shape
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

        captured: dict[int, torch.Tensor] = {}
        block_no = 0
        if self.double_blocks:
            img_mod = list(gather_levels(self.double_mod_img(vec), idx_img).chunk(6, dim=-1))
            txt_mod = (list(self.double_mod_txt(txt_vec).chunk(6, dim=-1))
                       if self.double_mod_txt is not None else None)
            for block in self.double_blocks:
                img, txt = self._run(block, img, txt, img_mod, txt_mod, rope, mask, backend)
                block_no += 1
                if block_no in capture:
                    captured[block_no] = img
                if block_no == stop_after:
                    return None, self._finish_capture(captured, project)
        if self.single_blocks:
            single_mod = list(gather_levels(self.single_mod(vec_all), idx_all).chunk(3, dim=-1))
            h = img if txt is None else torch.cat([txt, img], 1)
            for block in self.single_blocks:
                h = self._run(block, h, single_mod, rope, mask, backend)
                block_no += 1
                if block_no in capture:
                    captured[block_no] = h[:, n_txt:]
                if block_no == stop_after:
                    return None, self._finish_capture(captured, project)
            img = h[:, n_txt:]
        out = self.final[modality](img, vec, idx_img)
        return (out, self._finish_capture(captured, project)) if capture else out

    def _run(self, block: nn.Module, *args):
        if self.activation_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def _finish_capture(self, captured: dict[int, torch.Tensor], project: bool) -> dict[int, torch.Tensor]:
        return project_captured(self.projector, captured, project)


def project_captured(projector: nn.Module | None, captured: dict[int, torch.Tensor], project: bool
                     ) -> dict[int, torch.Tensor]:
    """Captured hidden states, through the Self-Flow projector when ``project`` (shared by the backbones)."""
    if not project:
        return captured
    if projector is None:
        raise RuntimeError("this model was built without a projector (model.projector_mult = 0)")
    return {k: projector(h) for k, h in captured.items()}


def count_parameters(cfg: MMDiTConfig) -> int:
    """Parameters of ``MMDiT(cfg)``, counted on the meta device (no memory)."""
    with torch.device("meta"):
        model = MMDiT(cfg)
    return sum(p.numel() for p in model.parameters())
