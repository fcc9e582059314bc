"""The checkpointer: gathers the training state from the components that own it, decides when to save,
writes it on rank 0 (a failure on any rank stops every rank) and exports the EMA weights.

Each component (model, EMA, optimizer, LR schedule, data streams, modality schedule, step generator, step
guard, the trainer's step counter) has ``state_dict()`` / ``load_state_dict()``; a checkpoint is
``{component name: its state}`` plus the resolved config. The adapters below give the model, optimizer,
generator and streams that interface; model and optimizer state is gathered unsharded (a collective under
FSDP2), so a checkpoint loads on any number of ranks and with either strategy.

A resume loads the newest intact checkpoint (a truncated, empty or non-finite newer one is named, moved aside
as ``<name>.corrupt`` and skipped) and refuses one whose model, objective or data config differs from the
run's (:func:`~selfflow.core.config.resume_conflicts`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import pickle
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
import yaml
from safetensors.torch import save_file
from torch import nn

from . import faults, parallel
from .atomic import atomic_path
from .checkpoint import (
    CheckpointLoadError,
    CheckpointWriteError,
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
    load_newest_intact,
    nonfinite_tensor,
    resume_hint,
    save_checkpoint,
)
from .config import (
    CheckpointConfig,
    ConfigError,
    RunConfig,
    location_keys,
    resume_conflicts,
    short_repr,
)
from .distributed import DistInfo, barrier, gather_objects, leave_out_of_step
from .model_folders import ModelFolders
from .pretrained import save_pretrained
from .safe_yaml import YamlError, parse_yaml

log = logging.getLogger("selfflow.checkpoint")


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
    """A torch generator's state, stored on the CPU with its device type and restored on the generator's device.

    A CPU generator (mt19937, 5,056 bytes of state) and a CUDA one (Philox, 16 bytes) cannot take each other's
    state, so a run moved between them (begun on a laptop, continued on a GPU, or back) cannot continue the same
    stream — its numbers differ on the other device anyway. The generator is then seeded from the saved state
    (deterministic, and a different seed at every checkpoint) and the move is logged."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def state_dict(self) -> dict[str, Any]:
        return {"state": self.generator.get_state().cpu(), "device": self.generator.device.type}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved, here = state["state"], self.generator.device.type
        # checkpoints before the device was recorded: a state of this generator's size is of its kind
        written_on = state.get("device", here if saved.numel() == self.generator.get_state().numel() else None)
        if written_on == here:
            self.generator.set_state(saved.to(self.generator.get_state().device))
            return
        seed = int.from_bytes(hashlib.sha256(saved.cpu().numpy().tobytes()).digest()[:7], "little")
        self.generator.manual_seed(seed)
        log.warning("selfflow: warning: the checkpoint's step generator ran on %s and this run's runs on %s: it is "
                    "seeded from the saved state instead (noise, timesteps and masks from here on differ from those "
                    "the run would have drawn there)", written_on or "another kind of device", here)


class StreamsState:
    """The read positions of every modality's data stream on this rank. Each rank reads its own share of the
    data (a corrupt sample, or an uneven split of the shards, puts ranks at different positions), so a
    checkpoint keeps every rank's (``per_rank``)."""

    per_rank = True

    def __init__(self, streams: Mapping[str, Stateful], resplit: bool = False):
        """``resplit``: a stream that can (``resplit_from``: the shard streams) goes on under another split of its
        data than the checkpoint's (other ranks, batch, data-loader workers or shuffle buffer) instead of refusing
        it."""
        self.streams, self.resplit = streams, resplit

    def state_dict(self) -> dict[str, Any]:
        return {n: s.state_dict() for n, s in self.streams.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check(state)
        for name, stream in self.streams.items():
            stream.load_state_dict(state[name])

    def load_every_rank(self, own: dict[str, Any], ranks: list[dict[str, Any]], world_size: int) -> None:
        """With ``resplit``: ``own``, this rank's share of the stored positions (as :meth:`load_state_dict` gets
        it), and every rank's; a stream split otherwise than it was goes on with ``resplit_from``, the others
        load ``own``."""
        self._check(own)
        for name, stream in self.streams.items():
            state = own[name]
            if hasattr(stream, "resplit_from") and (len(ranks) != world_size or not stream.resumes_exactly(state)):
                stream.resplit_from([r[name] for r in ranks])
            else:
                stream.load_state_dict(state)

    def _check(self, state: dict[str, Any]) -> None:
        missing = set(self.streams) - set(state)
        if missing:
            raise ConfigError(f"the checkpoint has no data position for {sorted(missing)}: the mixture changed")


class Checkpointer:
    """Saves and restores ``components`` under ``<run_dir>/checkpoints`` (section ``checkpoint`` of the
    config); every method that gathers state is a collective: call it on every rank."""

    def __init__(self, cfg: RunConfig, dist: DistInfo, components: dict[str, Stateful],
                 collective_state: bool = False, objectives: dict[str, dict[str, Any]] | None = None,
                 data_options: dict[str, dict[str, Any]] | None = None,
                 data_locations: dict[str, list[str]] | None = None,
                 model_locations: dict[str, list[str]] | None = None):
        """``collective_state``: gathering the state is itself a collective (sharded models, FSDP2).
        ``objectives``: each modality's resolved objective settings (``ResolvedObjective.settings``), and
        ``data_options`` its options with every default filled, both kept in the checkpoint: a resume tells a
        default written out from a changed objective, and sees a default that changed in the code (a plug-in's).
        ``data_locations``: each modality's options that say where its data lies (``location_options``), which a
        resume lets change: the data moved (its stream's state checks that it is the same data).
        ``model_locations``: each modality's options that say where a model it reads lies
        (``model_location_options``): a resume lets them change when the folder holds the same files as when the
        checkpoint was written (their fingerprints are kept in it), and refuses other files at the same path."""
        self.cfg: CheckpointConfig = cfg.checkpoint
        self.collective_state = collective_state and dist.enabled
        self.config = cfg.model_dump(mode="json")
        self.config_text = yaml.safe_dump(self.config)
        self.resolved_texts = {key: json.dumps(value, sort_keys=True) for key, value in
                               (("objectives", objectives), ("data_options", data_options)) if value is not None}
        self.data_locations = data_locations or {}
        self.model_folders = ModelFolders(self.config, model_locations or {})
        if (record := self.model_folders.record()) is not None:
            self.resolved_texts["model_files"] = record
        self.resumed_config: dict[str, Any] = {}  # the config stored in the checkpoint resumed from
        self.dist = dist
        self.components = components
        self.per_rank = [n for n, c in components.items() if getattr(c, "per_rank", False)]
        self.run_dir = cfg.run_dir
        self.dir = self.run_dir / "checkpoints"

    def due(self, step: int, total: int) -> bool:
        """A periodic checkpoint at ``step`` (the final one is written by the caller after the loop)."""
        return bool(self.cfg.every) and step % self.cfg.every == 0 and step < total

    def state_dict(self) -> dict[str, Any]:
        state = {**{n: c.state_dict() for n, c in self.components.items()}, "config": self.config_text}
        state.update(self.resolved_texts)
        return state

    def load_state_dict(self, state: dict[str, Any], source: Path | str = "the checkpoint") -> None:
        """Restore every component; a state that does not fit this run is an error naming ``source``."""
        missing = [n for n in self.components if n not in state]
        if missing:
            raise CheckpointLoadError(f"{source} has no {', '.join(missing)} state: not a checkpoint of this run")
        for name, component in self.components.items():
            try:
                part, own = state[name], self._this_ranks(name, state[name])
                if name in self.per_rank and getattr(component, "resplit", False):
                    ranks = part["per_rank"] if isinstance(part, dict) and "per_rank" in part else [part]
                    component.load_every_rank(own, ranks, self.dist.world_size)
                else:
                    component.load_state_dict(own)
            except ConfigError:  # a component's own message about the config (the mixture changed)
                raise
            # ValueError: a data stream refusing another split of its data (world size, batch, buffer)
            except (RuntimeError, KeyError, IndexError, TypeError, ValueError) as e:
                first = (str(e).splitlines() or [type(e).__name__])[0][:300]
                raise CheckpointLoadError(f"cannot resume from {source}: its {name} state does not fit this "
                                          f"run ({first})") from e

    def _this_ranks(self, name: str, part: Any) -> Any:
        """This rank's share of a ``per_rank`` component's stored state: its own on as many ranks as wrote it, else
        rank 0's (the component judges: a synthetic stream is one global sequence, a shard stream refuses another
        split). A checkpoint from before every rank's share was kept holds rank 0's only."""
        if name not in self.per_rank or not isinstance(part, dict):
            return part
        if "per_rank" not in part:
            if self.dist.enabled and self.dist.is_main:
                log.warning("selfflow: warning: the checkpoint was written before every rank's data position was kept: "
                            "each rank resumes at rank 0's, so a rank whose share of the data stood elsewhere reads "
                            "other samples than the uninterrupted run would have")
            return part
        ranks = part["per_rank"]
        return ranks[self.dist.rank] if len(ranks) == self.dist.world_size else ranks[0]

    def resume(self) -> Path | None:
        """Load the newest intact checkpoint, if any; returns its path. Newer broken ones are named, moved
        aside (rank 0) and skipped; a changed model, objective or data config is refused."""
        found = load_newest_intact(self.dir, map_location="cpu")
        if found is None:
            return None
        path, state, skipped = found
        try:
            stored = parse_yaml(str(state.get("config") or "{}"), f"the config stored in {path}")
        except YamlError as e:
            raise CheckpointLoadError(str(e)) from None
        objectives = self.resolved_texts.get("objectives")
        same_objectives = objectives is not None and state.get("objectives") == objectives
        stored = stored if isinstance(stored, dict) else {}
        record = ModelFolders.read_record(state)
        moved_models = self.model_folders.moved(stored, record)
        conflicts = [line + self.model_folders.note(line.split(" (", 1)[0], record) for line in resume_conflicts(
            stored, self.config, same_objectives, movable=location_keys(self.config, self.data_locations) | {
                key for key, _, _ in moved_models})]
        if conflicts:
            raise ConfigError(
                f"cannot resume from {path}: the config differs from the one it was trained with in "
                f"{'; '.join(conflicts)}. Use the same settings, another run name, or --no-resume "
                "(Trainer(cfg, resume=False) in Python) to start afresh")
        if replaced := self.model_folders.replaced(stored, record):
            raise ConfigError(
                f"cannot resume from {path}: {'; '.join(replaced)}. Put back the weights the run trained with, use "
                "another run name, or --no-resume")
        if changed := self._changed_defaults(state, moved_models):  # the same config, resolved otherwise
            raise ConfigError(
                f"cannot resume from {path}: settings the config leaves at their defaults resolve otherwise than "
                f"when it was trained (the objective kind's or the modality's code changed): {'; '.join(changed)}. "
                "Set them in the config to the checkpoint's values, use another run name, or --no-resume")
        self.load_state_dict(state, path)
        self.resumed_config = stored
        if self.dist.is_main:
            for bad, why in skipped:
                log.warning("selfflow: warning: skipped a broken checkpoint: %s%s; resuming from %s",
                            why, _move_aside(bad), path)
        return path

    def _changed_defaults(self, state: dict[str, Any], moved_models: list[tuple[str, str, str]]) -> list[str]:
        """``<modality>: objective.gamma (checkpoint 0.5, now 0.6)`` for each resolved setting the checkpoint and
        this run both have and disagree on (a checkpoint from before they were kept has none). Data and cache
        locations, and model folders moved with the same files, may differ."""
        lines = []
        for key, section in (("objectives", "objective"), ("data_options", "data.options")):
            if key not in self.resolved_texts or not isinstance(state.get(key), str):
                continue
            old, new = json.loads(state[key]), json.loads(self.resolved_texts[key])
            for modality in sorted(set(old) & set(new)):
                moved = set(self.data_locations.get(modality, [])) | {option for _, m, option in moved_models
                                                                      if m == modality}
                a, b = old[modality], new[modality]
                if key == "data_options":  # a nested location (text.cache_dir) leaves the rest of its option
                    a, b = _without(a, moved), _without(b, moved)
                lines += [f"{modality}: {section}.{k} (checkpoint {short_repr(a[k], 60)}, now {short_repr(b[k], 60)})"
                          for k in sorted(set(a) & set(b)) if a[k] != b[k]]
        return lines

    def set_aside(self) -> Path | None:
        """A fresh start (``--no-resume``) in a directory with checkpoints: rank 0 moves them into
        ``checkpoints/replaced-<time>/`` — kept, but no longer the newest, which a later plain rerun of the
        fresh run would otherwise resume from (pruning removes the lowest steps: the fresh run's own). A
        collective; returns the folder (on rank 0, when there was anything to move)."""
        folder = None
        if self.dist.is_main and (old := list_checkpoints(self.dir)):
            stamp, n = time.strftime("%Y%m%d-%H%M%S"), 1
            folder = self.dir / f"replaced-{stamp}"
            while folder.exists():  # two fresh starts within a second
                n += 1
                folder = self.dir / f"replaced-{stamp}-{n}"
            folder.mkdir()
            for _, ckpt in old:
                ckpt.replace(folder / ckpt.name)
            log.warning("selfflow: --no-resume: moved the %d checkpoint(s) of the earlier run (newest: %s) to %s",
                        len(old), old[-1][1].name, folder)
        barrier()
        return folder

    def save(self, step: int) -> Path | None:
        """Write the state as step ``step`` on rank 0. A failure on any rank — gathering the state, a failed
        write (e.g. a full disk), serialising it — stops every rank with a :class:`CheckpointWriteError`
        naming the checkpoint and the failing rank, instead of leaving the others waiting in the next
        collective. Returns the path on rank 0.

        Under FSDP2 gathering the state is a collective of its own: a rank that fails inside it cannot join
        the agreement below (the others are still in the gather, and a second collective would pair with
        theirs), so it stops alone with the message and its exit stops the others."""
        path, error, state, share = None, None, None, None
        try:
            faults.save_error(step, self.dist.rank)  # fault hook: a no-op unless its env variable is set
            state = self.state_dict()
            share = {name: state[name] for name in self.per_rank}
            pickle.dumps(share)  # fails here, not inside the collective below (where the others would wait)
        except Exception as e:  # agreed on below by every rank, whatever it is
            error, share = e, None
            if not isinstance(e, CheckpointWriteError):  # a bug, not a full disk: keep its traceback
                log.error("saving checkpoint %s failed on rank %d", checkpoint_path(self.dir, step),
                          self.dist.rank, exc_info=e)
            if state is None and self.collective_state:
                leave_out_of_step()
                raise CheckpointWriteError(_failed_gather_message(checkpoint_path(self.dir, step), self.dist.rank,
                                                                  _failure(e)[1])) from e
        # Every rank's failure so far (or None) and its share of the state (its data positions), to every rank:
        # a failure anywhere writes nothing, and every rank stops with the same message.
        shares = gather_objects((_failure(error), share))
        failures = {rank: f for rank, (f, _) in enumerate(shares) if f}
        if not failures:
            if self.dist.is_main:
                try:
                    state.update({name: {"per_rank": [s[name] for _, s in shares]} for name in self.per_rank})
                    path = save_checkpoint(state, self.dir, step, self.cfg.keep_last)
                except Exception as e:
                    error = e
                    if not isinstance(e, CheckpointWriteError):
                        log.error("saving checkpoint %s failed on rank 0", checkpoint_path(self.dir, step), exc_info=e)
            # rank 0's write (or its failure), to every rank: also the barrier after which the file is complete
            failures = {rank: f for rank, f in enumerate(gather_objects(_failure(error))) if f}
        if failures:
            raise CheckpointWriteError(_failed_save_message(checkpoint_path(self.dir, step), failures)) from error
        return path

    def export_ema(self, ema: nn.Module, model_config: Any, path: str | Path | None = None,
                   data_facts: dict[str, Any] | None = None) -> Path | None:
        """EMA weights as safetensors with the resolved model config in the metadata, for sampling and
        sharing (default ``<run_dir>/ema.safetensors``), and beside it the pretrained directory (with the run's
        ``data_facts``); the path on rank 0."""
        tensors = parallel.full_model_state(ema)
        if not self.dist.is_main:
            return None
        path = Path(path or self.run_dir / "ema.safetensors")
        bad = nonfinite_tensor(tensors)
        if bad:
            raise CheckpointWriteError(f"refusing to export {path}: the EMA weights are not finite ({bad}); "
                                       f"the last good checkpoint is {latest_checkpoint(self.dir) or '(none)'}")
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                      metadata={"model_config": model_config.model_dump_json()})
        # beside it, the same weights with the configs that rebuild the model (selfflow.core.pretrained)
        save_pretrained(path.parent / "pretrained", path, RunConfig.model_validate(self.config), model_config,
                        data_facts)
        return path


def _without(record: dict[str, Any], paths: set[str]) -> dict[str, Any]:
    """A copy of an options record without the dotted ``paths`` (``shards``, ``text.cache_dir``)."""
    out = copy.deepcopy(record)
    for path in paths:
        *parents, last = path.split(".")
        node = out
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return out


def _move_aside(bad: Path) -> str:
    """Rename a broken checkpoint to ``<name>.corrupt``, so that it is neither loaded again nor kept as the
    newest by pruning; says where it went (best effort: a read-only disk leaves it in place)."""
    aside = bad.with_name(bad.name + ".corrupt")
    try:
        bad.replace(aside)
    except OSError:
        return ""
    return f" (moved to {aside.name})"


def _failure(error: Exception | None) -> tuple[bool, str] | None:
    """What a rank tells the others about its part of a save: ``None`` (it went well) or ``(a failed write,
    the reason)``."""
    if error is None:
        return None
    if isinstance(error, CheckpointWriteError):
        return True, str(error)  # already names the file and the previous, intact checkpoint
    return False, faults.error_line(error)


def _failed_gather_message(path: Path, rank: int, why: str) -> str:
    """A rank that failed in the middle of gathering sharded state, alone (see :meth:`Checkpointer.save`)."""
    return (f"cannot write checkpoint {path}: rank {rank} failed gathering the sharded state: {why}. This rank "
            "stops; torchrun stops the others (without torchrun, the process group's timeout does); a rank "
            f"whose gather broke because another left names that rank's failure only in its log. "
            f"{resume_hint(path.parent)}")


def _failed_save_message(path: Path, failures: dict[int, tuple[bool, str]]) -> str:
    """One message for every rank, from the failures of the ranks that had one (``{rank: _failure}``)."""
    parts = [why if write else f"rank {rank} failed: {why}" for rank, (write, why) in failures.items()]
    if 0 in failures and failures[0][0] and len(failures) == 1:
        return parts[0]
    return f"cannot write checkpoint {path}: {'; '.join(parts)}. {resume_hint(path.parent)}"
