"""Wrapping the backbone for data parallelism: DDP, or FSDP2 (``fully_shard`` per block).

The EMA teacher follows the student's layout: replicated under DDP (it has no gradients to sync), sharded
block by block like the student under FSDP2, so its memory scales down with the ranks too. Full
(unsharded) state dicts are gathered for checkpoints through ``torch.distributed.checkpoint.state_dict``,
so a checkpoint loads on any number of ranks and with any strategy.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from .distributed import DistInfo

Strategy = Literal["none", "ddp", "fsdp2"]


def resolve_strategy(requested: str, info: DistInfo) -> Strategy:
    if requested not in ("auto", "none", "ddp", "fsdp2"):
        raise ValueError(f"train.parallel must be auto, none, ddp or fsdp2; got {requested!r}")
    if requested == "auto":
        return "ddp" if info.enabled else "none"
    if requested == "none" and info.enabled:
        raise ValueError("train.parallel is 'none' but the run has several ranks; use ddp or fsdp2")
    if requested != "none" and not info.enabled and not torch.distributed.is_initialized():
        # One plain process (no torchrun, no group of one made by the caller): nothing to wrap with. A run
        # trained under torchrun resumes here with the same command, as its checkpoints promise.
        warnings.warn(f"train.parallel is {requested!r} but this is one process without torchrun: training "
                      "unwrapped", UserWarning, stacklevel=2)
        return "none"
    return requested  # type: ignore[return-value]


def shard_fsdp2(model: nn.Module, bf16: bool, reshard_after_forward: bool = True) -> nn.Module:
    """``fully_shard`` every block, then the root (embeddings, modulation, heads). bf16 parameters with
    fp32 gradient reduction when ``bf16``. The forward's inputs are left as they come: FSDP2's default casts
    every floating-point input of a sharded module to bf16 — the noisy tokens, the timesteps (a dataclass's
    fields too) and the residual stream at each block — where DDP's autocast keeps them fp32 and casts only
    what a matrix product reads."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
          if bf16 else None)
    kwargs: dict[str, Any] = {"reshard_after_forward": reshard_after_forward}
    if mp is not None:
        kwargs["mp_policy"] = mp
    for block in model.blocks():
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    # torch warns when a sharded module returns a view (the MMDiT's velocity is a Linear over the sequence's
    # data-token slice): an in-place op on it would skip the backward all-gather. Nothing here changes a model's
    # output in place — the losses and samplers compute out of place — so the warning only alarms.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(.*\) returned a view tensor")
    return model


def wrap_student(model: nn.Module, strategy: Strategy, info: DistInfo, bf16: bool,
                 find_unused: bool = False) -> nn.Module:
    """``find_unused``: some parameters get no gradient in a step (mixed modalities, frozen parts)."""
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [info.device.index] if info.device.type == "cuda" else None
        return DDP(model, device_ids=ids, find_unused_parameters=find_unused)
    if strategy == "fsdp2":
        return shard_fsdp2(model, bf16)
    return model


def wrap_teacher(ema: nn.Module, strategy: Strategy, bf16: bool) -> nn.Module:
    if strategy == "fsdp2":
        return shard_fsdp2(ema, bf16)
    return ema


def unwrap(model: nn.Module) -> nn.Module:
    """The module holding the parameters (DDP's ``.module``; FSDP2 modules are their own)."""
    return getattr(model, "module", model)


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded state dict (collective under FSDP2; empty on ranks > 0 there)."""
    return get_model_state_dict(unwrap(model), options=_FULL)


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return get_optimizer_state_dict(unwrap(model), optimizer, options=_FULL)


def load_full_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    set_model_state_dict(unwrap(model), state, options=StateDictOptions(full_state_dict=True, strict=True))


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    set_optimizer_state_dict(unwrap(model), optimizer, state, options=StateDictOptions(full_state_dict=True))


def grad_sync(model: nn.Module, enabled: bool):
    """Context manager/switch to skip gradient synchronisation on accumulation micro-steps."""
    import contextlib

    if hasattr(model, "no_sync"):  # DDP
        return contextlib.nullcontext() if enabled else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()
