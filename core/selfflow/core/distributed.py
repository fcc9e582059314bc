"""Process-group setup for ``torchrun`` (and plain single-process runs), and small collectives.

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous variables; a plain
``python``/``selfflow`` process has none of them and runs as rank 0 of 1 without a process group.
Backend: NCCL on CUDA, gloo on CPU (so every distributed path is testable on a laptop).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from .stop_request import stop_with_parent


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_world_size() -> int:
    """The number of ranks ``torchrun`` started (``WORLD_SIZE``; 1 for a plain process), before any group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def one_process_only(what: str, instead: str) -> None:
    """Refuse ``what`` — work that does not shard over ranks — when torchrun started several: each rank would do
    all of it and write the same output. ``instead`` says what does shard, or why it need not."""
    if launched_world_size() > 1:
        from .config import ConfigError

        raise ConfigError(f"{what} runs in one process ({instead}): run it without torchrun")


def init_distributed(device: torch.device, timeout_s: int = 1800) -> DistInfo:
    """Join the ``torchrun`` process group if there is one; pick this rank's device."""
    world = launched_world_size()
    if world <= 1:
        return DistInfo(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun worker (its parent is the agent, not a shell)
        stop_with_parent()  # so it stops (cleanly, on SIGTERM) when its agent is killed
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        # Workers restarted by `torchrun --max-restarts` meet in the same agent store as the dead ones: keep
        # each attempt's keys apart, or the new group reads the old workers' addresses (connection refused).
        store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timeout))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"selfflow/attempt_{attempt}", store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def main_rank_first(work: Callable[[], None]) -> None:
    """Run ``work`` on rank 0 alone while the other ranks wait for it: files that every rank then reads
    (generated data) are made once, not by every rank into the same folder at the same time. Without a process
    group it just runs. An error on rank 0 ends the job as any error does (torchrun stops the waiting ranks)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        work()
    barrier()


def all_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average scalars over ranks (identity without a process group)."""
    if not dist.is_initialized() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order, on every rank (``[obj]`` without a process group); returns only
    when every rank has called it, so it is a barrier too."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_to_main(tensor: torch.Tensor) -> list[torch.Tensor] | None:
    """``tensor`` of every rank, in rank order, on rank 0 (``None`` on the others; ``[tensor]`` without a
    process group). Every rank's tensor must have the same shape and dtype."""
    if not dist.is_initialized():
        return [tensor]
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())] if dist.get_rank() == 0 else None
    dist.gather(tensor, parts, dst=0)
    return parts


_out_of_step = False


def leave_out_of_step() -> None:
    """This rank stops while the others are inside a collective it will not finish (a failure in the middle
    of gathering sharded state): :func:`destroy` must not wait for them in a barrier of its own, which would
    pair with their collective (gloo aborts, NCCL hangs). Its exit is what stops them: torchrun tears the
    group down when a worker fails (without torchrun, the process group's timeout does)."""
    global _out_of_step
    _out_of_step = True


def left_out_of_step() -> bool:
    """Whether this rank has left the others inside a collective (:func:`leave_out_of_step`)."""
    return _out_of_step


@contextlib.contextmanager
def torn_down_after() -> Iterator[None]:
    """Around a command's distributed work: afterwards the group is torn down together (:func:`destroy`). An
    error raised on this rank leaves the others where they are — maybe inside a collective this rank will not
    join, where a barrier of its own would pair with theirs and hang both until the group's timeout, the error
    unprinted — so the rank leaves out of step (:func:`leave_out_of_step`: no barrier); the CLI prints the
    error and ends the process, and torchrun stops the other ranks."""
    try:
        yield
    except BaseException:
        if dist.is_initialized() and dist.get_world_size() > 1:
            leave_out_of_step()
        raise
    finally:
        destroy()


def destroy() -> None:
    """Tear the group down together: a rank that leaves while another still talks to it can abort
    (gloo's pair threads), so every rank waits for the others first. A rank that has left the others
    mid-collective (:func:`leave_out_of_step`) leaves the group as it is: destroying it could wait on that
    collective (NCCL); the CLI ends the process at once instead (``os._exit``)."""
    if dist.is_initialized() and not _out_of_step:
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
