"""Heads from a backbone's captured hidden states to the space of the representation target.

:class:`Projector` is Self-Flow's (student features → teacher features, official: Linear(d, 2d) → SiLU →
Linear(2d, d)); :class:`MLPProjector` is REPA's (→ a frozen external encoder's width). A backbone keeps
one as its ``projector`` attribute and applies it inside ``forward`` (``project=True``), so DDP/FSDP see it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from .linear import Linear

_APART = 0x5E1F_F10  # mixes the stream-apart seed away from the draws of the stream it was taken from


@contextlib.contextmanager
def random_stream_apart() -> Iterator[None]:
    """Run the block on a random stream of its own, seeded from the global generators without advancing them.

    A backbone builds and initialises its projector inside this, so the rest of its weights are the same draws with
    a projector (Self-Flow, REPA) or without (flow matching): one ``train.seed`` gives every method the same
    starting backbone, which a paired-seed comparison takes for granted (it did not hold before session 24)."""
    # this rank's GPU only: forking every visible device made each rank of a node open a context on all of them
    # (a model built on the GPU has initialised CUDA by the time its projector is built; one on the CPU draws none)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        # from the fork's copy (the outer stream stays put), on the CPU whatever device the model is built on (meta)
        seed = int(torch.randint(0, 2**62, (1,), device="cpu").item())
        torch.manual_seed(seed ^ _APART)
        yield


def init_projector(projector: nn.Module | None) -> None:
    """Xavier linears and zero biases, drawn apart (:func:`random_stream_apart`)."""
    if projector is None:
        return
    with random_stream_apart():
        for m in projector.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)


def outside_projector(model: nn.Module, projector: nn.Module | None) -> Iterator[nn.Module]:
    """``model.modules()`` without the projector's (those are initialised apart)."""
    own = set() if projector is None else {id(m) for m in projector.modules()}
    return (m for m in model.modules() if id(m) not in own)


class Projector(nn.Module):
    """Self-Flow's head: ``Linear(dim, hidden) → SiLU → Linear(hidden, dim)``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.linear1 = Linear(dim, hidden)
        self.linear2 = Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(nn.functional.silu(self.linear1(x)))


class MLPProjector(nn.Module):
    """REPA's head: ``Linear → SiLU`` for each of ``dims`` (hidden…, out), the last Linear without activation."""

    def __init__(self, dim: int, dims: tuple[int, ...]):
        super().__init__()
        layers: list[nn.Module] = []
        for i, out in enumerate(dims):
            layers.append(Linear(dims[i - 1] if i else dim, out))
            if i < len(dims) - 1:
                layers.append(nn.SiLU())
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x)
