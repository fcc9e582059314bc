"""A trained model as a self-contained directory: ``config.json`` (the backbone config and the run config with
its data, codec and text-encoder references) and ``model.safetensors`` (the EMA weights).

:func:`save_pretrained` writes one (the trainer exports ``<run_dir>/pretrained/`` beside ``ema.safetensors``);
:func:`from_pretrained` rebuilds the backbone and its modality through :func:`~.run_setup.build_run`, the build
chain of training; :func:`load_model` accepts any of a run directory, a pretrained directory or a weights file.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, TypeAdapter, ValidationError
from torch import nn

from .atomic import atomic_path, atomic_write_text
from .checkpoint import CheckpointLoadError, load_weights
from .config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    load_config,
    location_keys,
    parse_override,
    short_repr,
    validation_problems,
)
from .data.data_facts import MODEL_FILES, read_facts, replaying
from .modality import Modality, model_location_options, options_locations
from .model_folders import ModelFolders
from .objective import UNKNOWN_KIND_OK
from .registry import get_modality, get_objective
from .run_setup import Run, build_run, pick_device, read_run_weights

FORMAT = "selfflow-pretrained"
VERSION = 1  # of config.json's layout; a newer file is refused rather than misread
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
log = logging.getLogger("selfflow")


def save_pretrained(out_dir: str | Path, weights: str | Path | dict[str, torch.Tensor], run_config: RunConfig,
                    model_config: BaseModel, data_facts: dict[str, Any] | None = None) -> Path:
    """Write ``out_dir/config.json`` and ``out_dir/model.safetensors``. ``weights``: a state dict, or a
    safetensors file to hard-link (copied where links are not possible); ``data_facts``: what the modalities
    read from their data (:mod:`.data.data_facts`), so the directory loads without it. Returns ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / WEIGHTS_FILE) as tmp:
        if isinstance(weights, dict):
            from safetensors.torch import save_file

            save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp),
                      metadata={"model_config": model_config.model_dump_json()})
        else:
            tmp.unlink()
            try:
                os.link(weights, tmp)  # the same bytes as ema.safetensors: no second copy on disk
            except OSError:
                shutil.copyfile(weights, tmp)
    config = {"format": FORMAT, "version": VERSION, "modalities": [e.modality for e in run_config.data.entries()],
              "model_config": model_config.model_dump(mode="json"), "run_config": run_config.model_dump(mode="json"),
              "data_facts": data_facts or {}}
    atomic_write_text(out / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    return out


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a selfflow pretrained config (\"format\": {FORMAT!r} missing)")
    if config.get("version", VERSION) != VERSION:
        raise ConfigError(f"{path} has layout version {config['version']!r}; this selfflow reads version {VERSION}: "
                          "a newer selfflow wrote it")
    if not isinstance(config.get("data_facts", {}), dict):
        raise ConfigError(f"{path}: \"data_facts\" must be a mapping, got {short_repr(config['data_facts'], 60)}")
    return config


def relocate(cfg: RunConfig, sets: Sequence[str], source: str) -> RunConfig:
    """``cfg`` with ``key=value`` settings (``--set``) that say where something lies on this machine — the options
    a modality declares with ``data_location``, ``model_location`` or ``cache_location`` (a VAE or text encoder
    folder, the data, a cache) — for a trained model used on another machine than it was trained on. Any other
    key is refused, naming the ones that may be set: it would change the model."""
    if not sets:
        return cfg
    try:
        entries = cfg.data.entries()
        locations = {e.modality: options_locations(TypeAdapter(get_modality(e.modality).Options).validate_python(
            e.options)) for e in entries}
    except (KeyError, ValueError, ValidationError) as e:  # a modality not installed here, or options it refuses
        raise ConfigError(f"{source}: cannot tell which options say where things lie ({str(e).splitlines()[0]})"
                          ) from None
    raw = cfg.model_dump(mode="json")
    allowed = location_keys(raw, locations)
    for text in sets:
        key = ".".join(parse_override(text)[0])
        if key not in allowed:
            raise ConfigError(f"--set {key}: a trained model takes only where things lie on this machine (its "
                              f"weights fix the rest): {', '.join(sorted(allowed)) or 'none here'}")
    try:
        return RunConfig.model_validate(apply_overrides(raw, list(sets)), context={UNKNOWN_KIND_OK: True})
    except ValidationError as e:
        raise ConfigError(f"--set: {validation_problems(e)[0]}") from None


def _build_for_weights(cfg: RunConfig, state: dict[str, torch.Tensor], source: str) -> Run:
    """:func:`build_run` for loading trained weights. Sampling never runs the objective, so a kind that is not
    installed here (a plug-in's) is only warned about, and whether the backbone has a projector follows the
    weights instead of the objective."""
    try:
        get_objective(cfg.objective.kind)
    except KeyError:
        log.warning("selfflow: warning: %s was trained with objective.kind %r, which is not installed here: it "
                    "loads for sampling, evaluation and export, but resuming its training needs that plug-in",
                    source, cfg.objective.kind)
        return build_run(cfg, projector=any(k.startswith("projector.") for k in state))
    return build_run(cfg)


@dataclass
class LoadedModel:
    """A backbone in eval mode with the modality it samples, its run config and its backbone config."""

    model: nn.Module
    modality: Modality
    config: RunConfig
    model_config: BaseModel
    data_facts: dict[str, Any]  # what its modalities read from their data (kept in an export)


def _loaded(run: Run, state: dict[str, torch.Tensor], device: str | torch.device, modality_name: str | None,
            source: str, facts: dict[str, Any] | None) -> LoadedModel:
    """``facts``: the record the run was loaded with (its model folders' fingerprints are checked and kept)."""
    modality = run.modality(modality_name, source)
    if recorded := (facts or {}).get(MODEL_FILES):
        _check_model_files(run, recorded, source)
        run.data_facts[MODEL_FILES] = recorded  # no reader asked for it: kept for a re-export
    try:
        run.backbone.load_state_dict(state)
    except RuntimeError as e:  # tensors of another shape or name: not this config's model
        raise CheckpointLoadError(f"the weights in {source} do not fit its config ({state_dict_mismatch(e)})") from None
    dev = pick_device(device, "device")
    return LoadedModel(run.backbone.to(dev).eval(), modality, run.config, run.model_config, run.data_facts)


def _check_model_files(run: Run, recorded: dict[str, str], source: str) -> None:
    """Warn for each model folder (VAE, text encoder) that holds other files than the run trained with — pointed
    elsewhere with ``--set``, or replaced in place: its samples then go through another model (a deliberate
    choice at times — another VAE decoder of the same latent space —, so a warning, not an error)."""
    config = run.config.model_dump(mode="json")
    here = ModelFolders(config, {name: model_location_options(m) for name, m in run.modalities.items()}).files
    for key in sorted(set(recorded) & set(here)):
        if recorded[key] != here[key]:
            log.warning("selfflow: warning: %s holds other files than %s was trained with (fingerprint %s then, %s "
                        "now): what it reads there — its samples' decoder, its text encoder — is another model",
                        key, source, recorded[key], here[key])


def state_dict_mismatch(error: RuntimeError, most: int = 3) -> str:
    """The lines of ``load_state_dict``'s error that name keys (``size mismatch for pos_embed: …``, ``Missing
    key(s) …``), not its header ``Error(s) in loading state_dict for MMDiT:`` alone."""
    lines = [line.strip()[:240] for line in str(error).splitlines()[1:] if line.strip()] or [str(error)[:240]]
    more = f"; … {len(lines) - most} more" if len(lines) > most else ""
    return "; ".join(lines[:most]) + more


def from_pretrained(path: str | Path, device: str | torch.device = "auto", modality_name: str | None = None,
                    locations: Sequence[str] = ()) -> LoadedModel:
    """A pretrained directory's model on ``device``; for a mixed model, ``modality_name`` picks the
    modality to sample (default: the first); ``locations``: ``key=value`` settings of where things lie on this
    machine (:func:`relocate`)."""
    root = Path(path)
    config = _read_config(root / CONFIG_FILE)
    try:
        cfg = RunConfig.model_validate(config["run_config"], context={UNKNOWN_KIND_OK: True})
    except KeyError:
        raise ConfigError(f"{root / CONFIG_FILE} has no \"run_config\"") from None
    except ValidationError as e:
        raise ConfigError(f"{root / CONFIG_FILE}: invalid run_config: "
                          f"{validation_problems(e, 'run_config')[0]}") from None
    cfg = relocate(cfg, locations, str(root / CONFIG_FILE))
    state = load_weights(root / WEIGHTS_FILE)
    facts = config.get("data_facts")
    with replaying(facts):  # the shards' codec.json, statistics …: not needed here
        run = _build_for_weights(cfg, state, str(root))
    built, stored = run.model_config.model_dump(mode="json"), config.get("model_config", {})
    differ = sorted(k for k in set(built) | set(stored) if built.get(k) != stored.get(k))
    if differ:
        moved = f" or does a folder set with --set ({', '.join(locations)}) hold another model" if locations else ""
        raise ConfigError(f"{root / CONFIG_FILE}: the run config builds a different model (keys {differ}): "
                          f"was it written by another selfflow version{moved}?")
    return _loaded(run, state, device, modality_name, str(root), facts)


def model_root(path: Path) -> Path:
    """The directory a model path stands for (a weights file's run or pretrained directory): where a command's
    outputs about that model go by default."""
    return path.parent if path.is_file() else path


def load_model(path: str | Path, device: str | torch.device = "auto", modality_name: str | None = None,
               weights: str = "ema", locations: Sequence[str] = ()) -> LoadedModel:
    """The model of a run directory (``config.yaml``; ``weights``: ``"ema"`` or ``"model"``), a pretrained
    directory (``config.json``) or a weights file inside either. ``locations``: ``key=value`` settings of where
    things lie on this machine, e.g. ``data.options.vae_path=/models/sd-vae`` (:func:`relocate`)."""
    p = Path(path)
    if p.is_file() and (p.suffix == ".pt" or p.name in ("config.yaml", CONFIG_FILE)):  # name the folder to pass
        where = p.parent.parent if p.parent.name == "checkpoints" else p.parent
        raise ConfigError(f"{p} is a {'checkpoint' if p.suffix == '.pt' else 'config'} of a model directory: "
                          f"pass the directory, {where} (its weights are found there)")
    root = p.parent if p.is_file() and p.name == WEIGHTS_FILE else p
    if weights != "ema" and root.is_dir() and (root / CONFIG_FILE).is_file():
        raise ConfigError(f"{root} is a pretrained directory: it holds the one set of weights that was exported "
                          f"(the EMA unless export --weights model), so weights={weights!r} cannot be chosen here")
    if p.is_file() and p.suffix == ".safetensors":
        if p.name == WEIGHTS_FILE and (p.parent / CONFIG_FILE).is_file():
            return from_pretrained(p.parent, device, modality_name, locations)
        if p.name == "ema.safetensors" and (p.parent / "config.yaml").is_file():
            if weights != "ema":
                raise ConfigError(f"{p} holds the EMA weights, not weights={weights!r}: pass the run directory "
                                  f"{p.parent} to load its newest checkpoint's model")
            p = p.parent
        else:
            raise ConfigError(f"{p}: a weights file is loaded from its run directory (beside config.yaml) or "
                              "pretrained directory (beside config.json)")
    if (p / CONFIG_FILE).is_file():
        return from_pretrained(p, device, modality_name, locations)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist (expected a run directory, a pretrained directory or a "
                                "weights file in one)")
    if not (p / "config.yaml").is_file():
        raise ConfigError(f"{p} is not a run directory (no config.yaml), a pretrained directory (no config.json) "
                          "or a weights file in one")
    cfg = relocate(load_config(p / "config.yaml", for_inference=True), locations, str(p / "config.yaml"))
    state = read_run_weights(p, weights)
    facts = read_facts(p)
    with replaying(facts):  # the data as it was read at training (also when it is gone)
        run = _build_for_weights(cfg, state, str(p))
    return _loaded(run, state, device, modality_name, str(p), facts)
