"""The checkpointer: gathers the training state from the components that own it, decides when to save,
writes it on rank 0 (every rank learns of a failed write) and exports the EMA weights.

Each component (model, EMA, optimizer, LR schedule, data streams, modality schedule, step generator, step
guard, the trainer's step counter) has ``state_dict()`` / ``load_state_dict()``; a checkpoint is
``{component name: its state}`` plus the resolved config. The adapters below give the model, optimizer,
generator and streams that interface; model and optimizer state is gathered unsharded (a collective under
FSDP2), so a checkpoint loads on any number of ranks and with either strategy.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
import yaml
from safetensors.torch import save_file
from torch import nn

from . import parallel
from .checkpoint import CheckpointWriteError, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import CheckpointConfig, ConfigError, RunConfig
from .distributed import DistInfo, barrier, broadcast_object


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class ModelState:
    """A (possibly DDP/FSDP2-wrapped) model's full, unsharded weights."""

    def __init__(self, model: nn.Module):
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return parallel.full_model_state(self.model)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        parallel.load_full_model_state(self.model, state)


class OptimizerState:
    """The optimizer's full state, keyed by parameter name (independent of sharding)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        return parallel.full_optimizer_state(self.model, self.optimizer)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        parallel.load_full_optimizer_state(self.model, self.optimizer, state)


class GeneratorState:
    """A torch generator's state, stored on the CPU and restored on the generator's device."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def state_dict(self) -> dict[str, Any]:
        return {"state": self.generator.get_state().cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["state"].to(self.generator.get_state().device))


class StreamsState:
    """The read positions of every modality's data stream."""

    def __init__(self, streams: Mapping[str, Stateful]):
        self.streams = streams

    def state_dict(self) -> dict[str, Any]:
        return {n: s.state_dict() for n, s in self.streams.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = set(self.streams) - set(state)
        if missing:
            raise ConfigError(f"the checkpoint has no data position for {sorted(missing)}: the mixture changed")
        for name, stream in self.streams.items():
            stream.load_state_dict(state[name])


class Checkpointer:
    """Saves and restores ``components`` under ``<run_dir>/checkpoints`` (section ``checkpoint`` of the
    config); every method that gathers state is a collective: call it on every rank."""

    def __init__(self, cfg: RunConfig, dist: DistInfo, components: dict[str, Stateful]):
        self.cfg: CheckpointConfig = cfg.checkpoint
        self.config_text = yaml.safe_dump(cfg.model_dump(mode="json"))
        self.dist = dist
        self.components = components
        self.run_dir = cfg.run_dir
        self.dir = self.run_dir / "checkpoints"

    def due(self, step: int, total: int) -> bool:
        """A periodic checkpoint at ``step`` (the final one is written by the caller after the loop)."""
        return bool(self.cfg.every) and step % self.cfg.every == 0 and step < total

    def state_dict(self) -> dict[str, Any]:
        return {**{n: c.state_dict() for n, c in self.components.items()}, "config": self.config_text}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, component in self.components.items():
            component.load_state_dict(state[name])

    def resume(self) -> Path | None:
        """Load the newest complete checkpoint, if any; returns its path."""
        ckpt = latest_checkpoint(self.dir)
        if ckpt is not None:
            self.load_state_dict(load_checkpoint(ckpt, map_location="cpu"))
        return ckpt

    def save(self, step: int) -> Path | None:
        """Write the state as step ``step`` on rank 0; a failed write (e.g. a full disk) stops every rank,
        not only rank 0. Returns the path on rank 0."""
        state = self.state_dict()
        path, error = None, None
        if self.dist.is_main:
            try:
                path = save_checkpoint(state, self.dir, step, self.cfg.keep_last)
            except CheckpointWriteError as e:
                error = str(e)
        error = broadcast_object(error)
        if error:
            raise CheckpointWriteError(error)
        barrier()
        return path

    def export_ema(self, ema: nn.Module, model_config: Any, path: str | Path | None = None) -> Path | None:
        """EMA weights as safetensors with the resolved model config in the metadata, for sampling and
        sharing (default ``<run_dir>/ema.safetensors``); the path on rank 0."""
        tensors = parallel.full_model_state(ema)
        if not self.dist.is_main:
            return None
        path = Path(path or self.run_dir / "ema.safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"model_config": model_config.model_dump_json()})
        tmp.replace(path)
        return path
