"""Heads from a backbone's captured hidden states to the space of the representation target.

:class:`Projector` is Self-Flow's (student features → teacher features, official: Linear(d, 2d) → SiLU →
Linear(2d, d)); :class:`MLPProjector` is REPA's (→ a frozen external encoder's width). A backbone keeps
one as its ``projector`` attribute and applies it inside ``forward`` (``project=True``), so DDP/FSDP see it.
"""

from __future__ import annotations

from torch import Tensor, nn


class Projector(nn.Module):
    """Self-Flow's head: ``Linear(dim, hidden) → SiLU → Linear(hidden, dim)``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.linear1 = nn.Linear(dim, hidden)
        self.linear2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(nn.functional.silu(self.linear1(x)))


class MLPProjector(nn.Module):
    """REPA's head: ``Linear → SiLU`` for each of ``dims`` (hidden…, out), the last Linear without activation."""

    def __init__(self, dim: int, dims: tuple[int, ...]):
        super().__init__()
        layers: list[nn.Module] = []
        for i, out in enumerate(dims):
            layers.append(nn.Linear(dims[i - 1] if i else dim, out))
            if i < len(dims) - 1:
                layers.append(nn.SiLU())
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x)
