"""The part of every backbone's ``forward`` that Self-Flow adds: capture, early exit, projection.

A backbone runs its blocks through one :class:`BlockWalk`, which numbers them ``1 … depth`` in forward
order, keeps the data-token hidden states of the ``capture`` blocks, tells the backbone to stop after
``stop_after`` and passes the captures through the backbone's projector when asked. The projector runs
inside ``forward`` so that DDP/FSDP see its parameters.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .backbone_protocol import Backbone


def check_layers(depth: int, capture: tuple[int, ...], stop_after: int | None) -> None:
    """Every requested block number lies in ``1 … depth``."""
    for k in (*capture, *(() if stop_after is None else (stop_after,))):
        if not 1 <= k <= depth:
            raise ValueError(f"block {k} is out of range 1..{depth}")


class BlockWalk:
    """One forward's walk through the blocks of ``model``.

    Per block: ``out = walk(block, *args)`` then ``if walk.finished(hidden, n_context): return walk.stopped()``;
    at the end ``return walk.output(velocity)``. ``hidden (B, n_context + L, D)`` is the block's output
    sequence; its first ``n_context`` tokens (text / class tokens) are not captured.
    """

    def __init__(self, model: Backbone, capture: tuple[int, ...], stop_after: int | None, project: bool):
        check_layers(model.depth, capture, stop_after)
        self.model, self.capture, self.stop_after, self.project = model, capture, stop_after, project
        self.block_no = 0
        self.captured: dict[int, Tensor] = {}

    def __call__(self, block: nn.Module, *args: Any) -> Any:
        """``block(*args)``, recomputed in backward when the model asks for activation checkpointing."""
        if self.model.activation_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def finished(self, hidden: Tensor, n_context: int = 0) -> bool:
        """Count the block just run, keep its data tokens if captured; True when the forward ends here."""
        self.block_no += 1
        if self.block_no in self.capture:
            self.captured[self.block_no] = hidden[:, n_context:] if n_context else hidden
        return self.block_no == self.stop_after

    def captures(self) -> dict[int, Tensor]:
        """The captured hidden states, through the model's projector when ``project``."""
        if not self.project:
            return self.captured
        if self.model.projector is None:
            raise RuntimeError("this model was built without a projector (model.projector_mult = 0)")
        return {k: self.model.projector(h) for k, h in self.captured.items()}

    def stopped(self) -> tuple[None, dict[int, Tensor]]:
        """The result of a forward that ended at ``stop_after``."""
        return None, self.captures()

    def output(self, velocity: Tensor) -> Tensor | tuple[Tensor, dict[int, Tensor]]:
        """The result of a full forward: the velocity, with the captures when any were requested."""
        return (velocity, self.captures()) if self.capture else velocity
