"""Building the pieces of a run from its config: :func:`build_run` (modalities → objectives → backbone
config → backbone, what every entry point shares), the device, optimizer groups, LR schedule, and
fine-tuning initialisation (``train.init_from``, ``train.freeze``)."""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from .arg_types import device_name, resolve_device
from .backbones import build_backbone
from .checkpoint import (
    CheckpointLoadError,
    latest_checkpoint,
    load_checkpoint,
    load_newest_intact,
    load_weights,
)
from .config import (
    ConfigError,
    MixtureEntry,
    OptimConfig,
    RunConfig,
    TrainConfig,
    short_repr,
)
from .data.data_facts import collecting
from .host_malloc import host_malloc_summary, keep_freed_memory
from .linear import cpu_kernels
from .modality import Modality, check_layout
from .objective import ResolvedObjective
from .registry import get_modality
from .undeclared_keys import did_you_mean, fields_along


def pick_device(name: str | torch.device, what: str = "train.device") -> torch.device:
    """A device setting (``auto``: CUDA when available; ``cpu``, ``cuda``, ``cuda:N`` or a ``torch.device``) as a
    device; a CUDA device this machine lacks, or a name that is none of these, is an error naming ``what``."""
    if isinstance(name, torch.device):
        if name.type != "cuda":  # cpu, mps …: nothing to check
            return name
        name = str(name)
    try:
        device_name(name)
    except argparse.ArgumentTypeError as e:
        raise ConfigError(f"{what}: {e}") from None
    return resolve_device(name)


def build_entry_modality(entry: MixtureEntry, where: str) -> Modality:
    """Instantiate one modality; option errors name ``<where>.options.<key>``."""
    cls = get_modality(entry.modality)
    try:
        return cls(entry.options)
    except ValidationError as e:
        lines = [f"invalid {where}.options for modality {entry.modality!r}:"]
        for err in e.errors():
            loc = list(err["loc"])
            if len(loc) > 1 and isinstance(loc[0], str) and loc[0] not in entry.options:
                del loc[0]  # the per-dataset union's tag (e.g. synthetic_shapes) is not a key the user wrote
            key = ".".join(str(p) for p in loc)
            unknown = err["type"] == "extra_forbidden"
            hint = did_you_mean(str(loc[-1]), fields_along(cls.Options, loc[:-1])) if unknown else ""
            lines.append(f"  {where}.options.{key}: {err['msg']} (got {short_repr(err['input'])}){hint}")
        raise ConfigError("\n".join(lines)) from None
    except (ValueError, FileNotFoundError) as e:  # a missing file or inconsistent options: name the keys
        keys = [f"{where}.options.{k}={v!r}" for k, v in entry.options.items()
                if k in str(e) or (isinstance(v, str) and v and v in str(e))]
        if keys and len(e.args) == 1 and isinstance(e.args[0], str):
            e.args = (f"{', '.join(keys)}: {e.args[0]}",)
        if isinstance(e, FileNotFoundError):
            raise
        raise ConfigError(f"invalid {where}.options for modality {entry.modality!r}: {e}") from None


def build_modalities(cfg: RunConfig) -> dict[str, Modality]:
    """Every modality of the run by name (one for single-modality runs)."""
    try:
        entries = cfg.data.entries()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    where = (lambda i: f"data.mixture.{i}") if cfg.data.mixture else (lambda i: "data")
    return {e.modality: build_entry_modality(e, where(i)) for i, e in enumerate(entries)}


def resolve_objectives(cfg: RunConfig, modalities: dict[str, Modality]) -> dict[str, ResolvedObjective]:
    """Each modality's objective: the run's objective with the mixture entry's overrides and the
    modality's defaults (mask ratio, timestep distribution)."""
    entries = {e.modality: e for e in cfg.data.entries()}
    out = {}
    try:
        for name, mod in modalities.items():
            e = entries[name]
            obj_cfg = cfg.objective.model_copy(update={k: v for k, v in (
                ("mask_ratio", e.mask_ratio), ("timesteps", e.timesteps)) if v is not None})
            out[name] = obj_cfg.resolve(cfg.model.depth, mod.default_mask_ratio, mod.default_timesteps)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return out


def _check_one_conditioning(modalities: dict[str, Modality]) -> None:
    """One backbone conditions every step the same way: a text-conditioned model needs a context on every
    batch and a class-conditional one a label, so a mixture of captioned and class-labelled (or unconditioned)
    modalities would fail on its first batch of the other kind."""
    kinds = {n: "text" if m.context_dim else ("class" if m.num_classes else "none") for n, m in modalities.items()}
    if len(set(kinds.values())) > 1:
        raise ConfigError(f"the modalities of a mixed run must share one conditioning; got {kinds} (set "
                          "`conditioning: text` and a caption source on every entry, e.g. image_text_shards for "
                          "images, or class labels on every entry)")


def _agreed(values: dict[str, int], what: str) -> int:
    distinct = {v for v in values.values() if v}
    if len(distinct) > 1:
        raise ConfigError(f"the modalities of a mixed run must agree on {what}; got {values}")
    return distinct.pop() if distinct else 0


def build_model_config(cfg: RunConfig, modalities: Modality | dict[str, Modality], uses_projector: bool) -> Any:
    """The backbone config with every modality's projections, the shared class table and text-context
    width, and (if the objective needs one) a projector."""
    if isinstance(modalities, Modality):
        modalities = {modalities.name: modalities}
    _check_one_conditioning(modalities)
    update: dict[str, Any] = {
        "modalities": {n: m.token_channels for n, m in modalities.items()},
        "num_classes": _agreed({n: m.num_classes for n, m in modalities.items()}, "the number of classes"),
    }
    context = _agreed({n: m.context_dim for n, m in modalities.items()}, "the text-embedding width")
    if "context_dim" in type(cfg.model).model_fields:
        update["context_dim"] = context
    elif context:
        raise ConfigError(f"model.arch {cfg.model.arch!r} has no text-context stream; use arch: mmdit")
    if not uses_projector:
        update["projector_mult"] = 0.0
    return cfg.model.model_copy(update=update)


@dataclass
class Run:
    """A run's pieces, built from its config the same way by training, sampling, evaluation and the
    config fuzzer."""

    config: RunConfig
    modalities: dict[str, Modality]  # by name, in config order (one for single-modality runs)
    objectives: dict[str, ResolvedObjective]  # by modality name
    model_config: Any  # the backbone config with every modality's projections
    backbone: nn.Module  # freshly initialised; on the CPU (or the device given to build_run)
    data_facts: dict[str, Any] = field(default_factory=dict)  # what the modalities read from their data

    @property
    def mixed(self) -> bool:
        return len(self.modalities) > 1

    def modality(self, name: str | None, source: str) -> Modality:
        """The modality called ``name`` (default: the first); an error names ``source`` and the choices."""
        if name is not None and name not in self.modalities:
            raise ConfigError(f"{source} trained {sorted(self.modalities)}, not {name!r}")
        return self.modalities[name or next(iter(self.modalities))]


def build_run(cfg: RunConfig, *, device: str | torch.device = "cpu", projector: bool | None = None) -> Run:
    """Modalities → objectives → backbone config → backbone. The backbone is initialised after seeding
    torch's global RNG with ``train.seed``, so a run's initial weights depend on its config only;
    ``device="meta"`` builds it without memory (config checks). ``projector``: whether the backbone has one,
    given instead of resolving the objectives (``objectives`` is then empty) — loading trained weights whose
    objective kind is not installed here."""
    with collecting() as facts:
        modalities = build_modalities(cfg)
    for m in modalities.values():
        check_layout(m)
    if projector is None:
        objectives = resolve_objectives(cfg, modalities)
        projector = any(o.uses_projector for o in objectives.values())
    else:
        objectives = {}
    model_config = build_model_config(cfg, modalities, projector)
    torch.manual_seed(cfg.train.seed)
    with torch.device(device):
        backbone = build_backbone(model_config)
    check = getattr(backbone, "check_positions", None)  # optional (Backbone protocol)
    if check is not None:
        for name, m in modalities.items():
            try:
                check(m.sample_ids(1, "cpu"), name)
            except ValueError as e:
                raise ConfigError(str(e)) from None
    return Run(cfg, modalities, objectives, model_config, backbone, facts)


def read_run_weights(run_dir: Path, weights: str = "ema") -> dict[str, torch.Tensor]:
    """A run directory's weights: ``ema.safetensors``, else (or for ``weights="model"``) the newest
    checkpoint's ``weights`` entry. The file is written when a run finishes: a run trained on after it (resumed
    with more steps, then stopped) has newer checkpoints, whose EMA is then used, with a warning that says so."""
    ema_file = run_dir / "ema.safetensors"
    export = ema_file if weights == "ema" and ema_file.is_file() else None

    def export_is_newer(ckpt: Path | None) -> bool:
        return ckpt is None or export.stat().st_mtime >= ckpt.stat().st_mtime

    # the file names first: a checkpoint is loaded only when one is newer than the export
    if export is not None and export_is_newer(latest_checkpoint(run_dir / "checkpoints")):
        return load_weights(export)
    found = load_newest_intact(run_dir / "checkpoints")
    if export is not None and export_is_newer(found and found[0]):  # the newer checkpoints were broken
        return load_weights(export)
    if found is None:
        raise FileNotFoundError(f"no weights in {run_dir}: neither {ema_file} nor checkpoints/step_*.pt")
    ckpt, state, skipped = found
    if export is not None:
        logging.getLogger("selfflow.checkpoint").warning(
            "selfflow: warning: %s is older than %s (the run trained on after it was written): using that "
            "checkpoint's EMA weights", ema_file, ckpt)
    for _, why in skipped:
        logging.getLogger("selfflow.checkpoint").warning("selfflow: warning: skipped %s; using %s", why, ckpt)
    if weights not in state:
        raise CheckpointLoadError(f"checkpoint {ckpt} has no {weights!r} weights")
    return state[weights]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on norms, biases and embeddings (every tensor with < 2 dims, and embeddings)."""
    decay, no_decay = [], []
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if p.requires_grad:
                (no_decay if p.ndim < 2 or isinstance(module, nn.Embedding) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def set_torch_globals(train: TrainConfig, device: torch.device) -> None:
    """The process-wide settings a run asks for: CPU threads, TF32 matmuls on CUDA, and on the CPU a malloc that
    keeps freed memory for the next step (:mod:`.host_malloc`)."""
    if device.type == "cpu":
        keep_freed_memory()
    if train.num_threads:
        torch.set_num_threads(train.num_threads)
    if device.type == "cuda" and train.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def cpu_settings_summary() -> str:
    """What the CPU runs on, for a run's first log line and ``bench.meta.json``:
    ``"Linear: oneDNN, malloc keeps freed memory"``."""
    return f"Linear: {cpu_kernels()}, {host_malloc_summary()}"


def build_optimizer(model: nn.Module, optim: OptimConfig, total_steps: int
                    ) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over :func:`param_groups` and its warm-up/decay schedule. ``optim.implementation: fused`` runs
    one kernel over all parameters (on the CPU ~6× faster than the per-tensor paths, which matters
    when the optimizer is a third of a small model's step)."""
    kernel = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}
    optimizer = torch.optim.AdamW(param_groups(model, optim.weight_decay), lr=optim.lr, betas=optim.betas,
                                  eps=optim.eps, **kernel[optim.implementation])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, optim.warmup_steps, total_steps, optim.schedule, optim.min_lr_ratio))
    return optimizer, scheduler


HYPERPARAMETERS = ("initial_lr", "weight_decay", "betas", "eps")


def reapply_hyperparameters(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                            fresh: list[dict[str, Any]]) -> list[str]:
    """After a resume: the run config's AdamW hyperparameters (``fresh``, read off the optimizer as built)
    over those the checkpoint brought back, and the schedule's base rate with them — so a resume with a lower
    ``optim.lr`` trains at it, as ``config.yaml`` says. Returns what changed, for the log."""
    groups: dict[str, list[int]] = {}  # "lr 0.001 → 0.0005": the param groups it changed in
    for i, (group, want) in enumerate(zip(optimizer.param_groups, fresh)):
        for k in HYPERPARAMETERS:
            was = tuple(group[k]) if isinstance(group[k], (list, tuple)) else group[k]
            now = tuple(want[k]) if isinstance(want[k], (list, tuple)) else want[k]
            if was != now:
                groups.setdefault(f"{'lr' if k == 'initial_lr' else k} {was} → {now}", []).append(i)
                group[k] = want[k]
    changed = [f"{what} (param group{'s' if len(ids) > 1 else ''} {', '.join(map(str, ids))})"
               for what, ids in groups.items()]
    scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    return changed


def lr_factor(step: int, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then constant or cosine down to ``min_ratio``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def read_init_weights(source: str | Path, which: str = "ema") -> tuple[dict[str, torch.Tensor], Path]:
    """Weights to fine-tune from and the file they came from: a checkpoint file, a run directory (its newest intact
    checkpoint — a broken newer one is named and passed over, as a resume does — else its ``ema.safetensors``) or
    a safetensors file."""
    src = Path(source)
    if src.is_dir():
        found = load_newest_intact(src / "checkpoints")
        if found is not None:
            src, state, skipped = found
            for _, why in skipped:
                logging.getLogger("selfflow.checkpoint").warning("selfflow: warning: train.init_from: skipped %s; "
                                                                 "using %s", why, src)
        elif (src / "ema.safetensors").is_file():
            return load_weights(src / "ema.safetensors"), src / "ema.safetensors"
        else:
            raise FileNotFoundError(f"train.init_from: {source} holds neither checkpoints/step_*.pt nor "
                                    "ema.safetensors")
    elif src.suffix == ".safetensors":
        return load_weights(src), src
    else:
        state = load_checkpoint(src)
    if which not in state:
        raise KeyError(f"train.init_from: {src} has no {which!r} weights")
    return state[which], src


def init_from(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """Load matching weights; parameters the source lacks (a new modality's projections) keep their fresh
    initialisation and source entries the model lacks are ignored — both are reported. A shape mismatch
    is an error naming the key."""
    own = model.state_dict()
    bad = [f"{k}: source {tuple(v.shape)} vs model {tuple(own[k].shape)}"
           for k, v in state.items() if k in own and v.shape != own[k].shape]
    if bad:  # one line a terminal can show: a model of another size differs in nearly every tensor
        more = f"; … ({len(bad)} tensors in all)" if len(bad) > 4 else ""
        raise ValueError("train.init_from: shapes differ for " + "; ".join(bad[:4]) + more
                         + ": give the model section of the source run (its config.yaml: preset, hidden_size, depth …)")
    result = model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return {"fresh": list(result.missing_keys), "ignored": sorted(set(state) - set(own))}


def freeze(model: nn.Module, prefixes: list[str]) -> int:
    """Stop gradients for the parameters under each of ``prefixes`` — a module path (``double_blocks``,
    ``single_blocks.0``) or a parameter name, matched on whole dotted parts: ``single_blocks.1`` is block 1, not
    blocks 10–19. Returns how many values are frozen. A prefix that matches nothing is refused, naming the model's
    top-level modules: a typo would otherwise train everything."""
    params = dict(model.named_parameters())
    frozen: set[str] = set()
    for prefix in prefixes:
        path = prefix.rstrip(".")
        under = [name for name in params if name == path or name.startswith(path + ".")]
        if not under:
            tops = sorted({name.split(".")[0] for name in params})
            raise ConfigError(f"train.freeze: {prefix!r} matches no parameter (a module path or parameter name, "
                              f"e.g. {tops[0]!r}; the model's top-level modules: {', '.join(tops)})")
        frozen.update(under)
    for name in frozen:
        params[name].requires_grad_(False)
    return sum(params[name].numel() for name in frozen)
