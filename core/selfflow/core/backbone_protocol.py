"""What the trainer, the objective and the samplers require of a backbone and of its config.

Any ``nn.Module`` that satisfies :class:`Backbone`, with a pydantic config that satisfies
:class:`BackboneConfig`, can be registered (:mod:`.backbones`) and trained with Self-Flow. Blocks are
numbered ``1 … depth`` in forward order; ``capture=`` / ``stop_after=`` and the objective's student and
teacher layers use that numbering. :class:`~.block_walk.BlockWalk` implements the capture / early-exit /
projection part of ``forward`` once for every backbone, and :mod:`.projector` holds the projector heads.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from .modulation import TokenTimesteps


@runtime_checkable
class Backbone(Protocol):
    """A velocity network ``forward(x (B, L, C), ids (B, L, 3), t, cond) → v (B, L, C)`` in RF time.

    ``t`` is ``(B,)``, ``(B, L)`` or a :class:`~.modulation.TokenTimesteps`; ``cond`` a
    :class:`~.tokens.Conditioning` (or None). With ``capture=(k, …)`` it returns ``(velocity, {k: (B, L, D)})``,
    the data-token hidden states after block ``k``; ``project=True`` passes them through ``projector``;
    ``stop_after=k`` ends the forward after block ``k`` and returns ``(None, captures)`` (the EMA teacher
    needs nothing deeper). ``modality`` selects the input/output projections of a multi-modality model.
    """

    projector: nn.Module | None  # student features → representation target (None: built without one)
    activation_checkpointing: bool  # recompute each block in backward (set by the trainer)

    @property
    def depth(self) -> int:
        """Number of blocks."""
        ...

    @property
    def null_label(self) -> int:
        """The class id that means "no label" (classifier-free guidance, label dropout)."""
        ...

    def blocks(self) -> list[nn.Module]:
        """The blocks in forward order: units of FSDP2 sharding, ``torch.compile`` and checkpointing."""
        ...

    def forward(self, x: torch.Tensor, ids: torch.Tensor, t: Any, cond: Any = None, *,
                modality: str | None = None, capture: tuple[int, ...] = (), stop_after: int | None = None,
                project: bool = False) -> Any:
        ...

    def forward_flops(self, n_data: int, n_context: int = 0, upto: int | None = None) -> float:
        """Analytic matmul FLOPs of one sample's forward through blocks ``1 … upto`` (all and the head if None)."""
        ...

    # Optional: ``check_positions(ids (B, L, 3), modality: str) -> None`` raises a ValueError for a token layout
    # the backbone's position encoding cannot represent (the DiT's 2-D table and a time axis); the run setup
    # calls it with each modality's sample layout before training.


@runtime_checkable
class BackboneConfig(Protocol):
    """A pydantic model (``extra="forbid"``) with a literal ``arch`` field naming its backbone.

    The run config's ``model`` section is validated against the config class registered for
    ``model.arch``. Before building, the trainer fills ``modalities`` (modality → token channels),
    ``num_classes`` and ``projector_mult`` (0: the objective needs no projector) with ``model_copy``.
    """

    arch: str
    modalities: dict[str, int]
    num_classes: int
    projector_mult: float

    @property
    def depth(self) -> int:
        ...


def check_forward_inputs(x: Any, ids: Any, t: Any, labels: Any, *, modality: str, channels: int,
                         num_classes: int) -> None:
    """Raise a ValueError naming the expected layout when ``forward``'s arguments cannot be right, instead of
    a matmul or embedding error deep inside the network.

    Shapes and dtypes only: reading values (a label range) would sync the device on every training step.
    ``ids`` may have batch 1 (shared by the batch); ``t``'s shape is checked by ``TokenTimesteps.coerce``.
    """
    def shape(v: Any) -> str:
        return f"{tuple(v.shape)} {v.dtype}" if isinstance(v, torch.Tensor) else type(v).__name__

    if not (isinstance(x, torch.Tensor) and x.ndim == 3 and x.shape[-1] == channels and x.is_floating_point()):
        raise ValueError(f"x must be a float tensor (B, L, C) with C={channels} for modality {modality!r}; "
                         f"got {shape(x)} (C is the modality's token_channels, which its encode must give)")
    b, n = x.shape[:2]
    if not (isinstance(ids, torch.Tensor) and ids.ndim == 3 and ids.shape[0] in (1, b) and ids.shape[1:] == (n, 3)):
        raise ValueError(f"ids must be (B, L, 3) = {(b, n, 3)} for x (B, L, C) = {tuple(x.shape)}; got {shape(ids)}")
    if not isinstance(t, torch.Tensor | TokenTimesteps):
        raise ValueError(f"t must be a tensor (B,) or (B, L) (B={b}, L={n}) or a TokenTimesteps; got {shape(t)}")
    if num_classes and labels is not None and not (
            isinstance(labels, torch.Tensor) and labels.shape == (b,)
            and not (labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool)):
        raise ValueError(f"cond.labels must be integer class ids (B,) = ({b},) for x (B, L, C) = {tuple(x.shape)}, "
                         f"in 0…{num_classes} ({num_classes}: the null label); got {shape(labels)}")


def embed_labels(table: nn.Embedding, labels: torch.Tensor) -> torch.Tensor:
    """``table(labels)``, with an out-of-range id named instead of ``IndexError: index out of range in self``.

    Catching the error costs nothing per step (an up-front range check would sync the device); on CUDA an
    out-of-range id is a device-side assert that cannot be caught.
    """
    try:
        return table(labels)
    except IndexError as e:
        null = table.num_embeddings - 1
        raise ValueError(f"class labels must lie in 0…{null} ({null}: the null label); got "
                         f"{labels.flatten()[:8].tolist()}") from e


def captured(out: Any, blocks: tuple[int, ...]) -> tuple[Any, dict[int, torch.Tensor]]:
    """A backbone's output for ``capture=blocks``, checked: ``(velocity, {k: (B, L, D)})`` holding each block
    asked for. A forward that ignores ``capture`` returns the velocity alone, which ``pred, feats = …`` would
    split along the batch axis into a confusing error (or, at batch 2, a wrong one) far from the cause."""
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict) and all(k in out[1] for k in blocks):
        return out
    if isinstance(out, torch.Tensor):
        got = f"a tensor {tuple(out.shape)}"
    elif isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict):
        got = f"features of blocks {sorted(out[1])}"
    else:
        got = f"a {type(out).__name__}" + (f" of {len(out)}" if isinstance(out, tuple) else "")
    raise ValueError(f"the backbone's forward, asked for capture={blocks}, must return (velocity, {{block: "
                     f"features (B, L, D)}}) holding blocks {list(blocks)}; got {got}")
