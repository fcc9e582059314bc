"""Page-locked (pinned) host batches and their copy to the training device (``data.pin_memory``).

A copy from pageable host memory to a GPU goes through a staging buffer and blocks the host; from pinned
memory it is a direct DMA that ``non_blocking=True`` only queues on the current stream, so the host goes on
launching the step's kernels, which the stream runs after the copy. The trainer pins each collated batch
and moves it here, once, for every modality.

There is no prefetch thread that pins or copies batches ahead of the trainer: the checkpoint records each
stream's position at the last batch it handed out (``ShardStream.consumed``), so a batch pulled ahead of a
checkpoint would count as trained on without being trained on, and a resume would skip it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, TypeVar

import torch

T = TypeVar("T")


def resolve_pin_memory(setting: bool | Literal["auto"], device: torch.device) -> bool:
    """``data.pin_memory`` on a run training on ``device``: ``auto`` pins exactly when it is a CUDA device;
    ``true`` on any other device is an error, since pinning then only costs a host copy per batch."""
    if setting == "auto":
        return device.type == "cuda"
    if setting and device.type != "cuda":
        raise ValueError(f"data.pin_memory is true but the training device is {device.type!r}: pinned memory "
                         "only speeds copies to a CUDA device (set data.pin_memory to auto or false)")
    return bool(setting)


def _map_tensors(fn: Callable[[torch.Tensor], torch.Tensor], value: T) -> T:
    """``value`` with ``fn`` applied to every tensor inside its dicts, lists and tuples; other leaves (captions,
    numbers) unchanged."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {k: _map_tensors(fn, v) for k, v in value.items()}  # type: ignore[return-value]
    if type(value) in (list, tuple):
        return type(value)(_map_tensors(fn, v) for v in value)  # type: ignore[call-arg]
    return value


def pin_batch(batch: T) -> T:
    """``batch`` with every CPU tensor copied into page-locked host memory (needs CUDA); tensors already
    pinned or on a device are kept."""
    return _map_tensors(lambda t: t if t.device.type != "cpu" or t.is_pinned() else t.pin_memory(), batch)


def batch_to_device(batch: T, device: torch.device | str) -> T:
    """``batch`` with every tensor on ``device``. Pinned tensors are copied with ``non_blocking=True``
    (asynchronous to the host; torch keeps a pinned block alive until its copy is done); others as ``.to``
    does, synchronously; tensors already there are kept as they are."""
    return _map_tensors(lambda t: t.to(device, non_blocking=t.is_pinned()), batch)
