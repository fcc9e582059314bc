"""Run configuration: pydantic models loaded from YAML, with ``--set a.b=c`` overrides.

Every section forbids unknown keys, so a typo is an error that names the key, the value and the file
instead of a silently ignored setting. The resolved config is written to the run directory.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    field_validator,
)

from .atomic import atomic_write_text
from .backbones import DEFAULT_ARCH, backbone_spec, validate_model_config
from .mmdit import MMDiTConfig
from .objective import UNKNOWN_KIND_OK, ObjectiveConfig
from .safe_yaml import YamlError, parse_yaml
from .sampler import SamplerConfig, SamplerSettings, resolve_sampler
from .timesteps import TimestepDistribution
from .undeclared_keys import did_you_mean, fields_along

if TYPE_CHECKING:
    from .modality import Modality


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the file, key and value."""


# A per-rank batch above this is a typo (an extra zero or two), not a run: refused at validation instead of
# an out-of-memory crash minutes later.
MAX_BATCH_SIZE = 65536


class _Section(BaseModel):
    # validate_assignment: ``cfg.train.steps = -5`` in Python is refused as the same key in a YAML file is
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class MixtureEntry(_Section):
    """One modality of a mixed run: its data options, its share of the steps, its batch size and its sampler."""

    modality: str = Field(description="registered modality name")
    options: dict[str, Any] = Field(default_factory=dict, description="validated by the modality")
    weight: float = Field(1.0, gt=0, description="relative probability of a step on this modality")
    batch_size: int | None = Field(None, ge=1, le=MAX_BATCH_SIZE, description="per rank (None: train.batch_size)")
    mask_ratio: float | None = Field(None, ge=0, le=1, description="None: objective / modality default")
    timesteps: TimestepDistribution | None = Field(None, description="None: objective / modality default")
    sample: SamplerSettings = Field(
        default_factory=SamplerSettings,
        description="this modality's sampler (previews, online evaluation, `selfflow sample --modality`); "
                    "precedence: these keys > the run's `sample` section > the modality's defaults (e.g. video's "
                    "training shift) > SamplerConfig's defaults")


class DataConfig(_Section):
    modality: str = Field("image", description="registered modality name (see `selfflow modalities`)")
    options: dict[str, Any] = Field(default_factory=dict, description="validated by the modality")
    mixture: list[MixtureEntry] | None = Field(
        None, description="mixed training: one modality per step, drawn by weight (replaces modality/options)")
    pin_memory: bool | Literal["auto"] = Field(
        "auto", description="pin each batch in page-locked host memory and copy it to the GPU asynchronously "
        "(auto: when training on CUDA; true on another device is an error)")

    def entries(self) -> list[MixtureEntry]:
        """The mixture, or the single modality as a one-entry mixture."""
        if self.mixture:
            names = [e.modality for e in self.mixture]
            if len(set(names)) != len(names):
                raise ValueError(f"data.mixture names a modality twice: {names}")
            return list(self.mixture)
        return [MixtureEntry(modality=self.modality, options=self.options)]


class OptimConfig(_Section):
    lr: float = Field(1e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["constant", "cosine"] = Field("constant", description="after the warm-up")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine floor as a fraction of lr")
    implementation: Literal["fused", "foreach", "for-loop"] = Field(
        "fused", description="AdamW kernel: fused (one kernel for all tensors; fastest on CPU and GPU), foreach "
        "(torch's default on GPU) or for-loop (torch's default on CPU); they differ at float rounding")


class EMAConfig(_Section):
    decay: float = Field(0.9999, ge=0, le=1)
    warmup: bool = Field(False, description="use min(decay, (1+n)/(10+n)) at step n: short runs get a "
                         "usable average (the paper's 4M-step runs use a fixed 0.9999)")

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay


class TrainConfig(_Section):
    """The training loop itself: steps, batch, precision, parallelism, stop policies, fine-tuning start."""

    steps: int = Field(1000, ge=1)
    batch_size: int = Field(32, ge=1, le=MAX_BATCH_SIZE, description="per rank")
    seed: int = 0
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="bf16 autocast: the GPU recipe; on a CPU fast only with AVX512-BF16 / AMX (else it warns)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_threads: int = Field(0, ge=0, description="torch CPU threads (0: leave torch's default)")
    parallel: Literal["auto", "none", "ddp", "fsdp2"] = Field("auto", description="auto: ddp with >1 rank")
    grad_accum_steps: int = Field(1, ge=1, description="micro-batches per optimizer step")
    max_nonfinite_steps: int = Field(10, ge=1, description="abort after this many non-finite steps in a row")
    max_bad_data_fraction: float = Field(0.05, ge=0, le=1, description="stop when more than this fraction of "
                                         "the samples read were corrupt and skipped (1: never stop)")
    activation_checkpointing: bool = False
    compile: bool = Field(False, description="torch.compile each block")
    tf32: bool = Field(True, description="TF32 matmuls on CUDA")
    init_from: str | None = Field(None, description="fine-tune: start from this checkpoint file, run "
                                  "directory or ema.safetensors (new modality heads start fresh)")
    init_weights: Literal["ema", "model"] = Field("ema", description="which weights of init_from to start from")
    freeze: list[str] = Field(default_factory=list, description="module paths (or parameter names) to keep "
                              "frozen, matched on whole dotted parts: single_blocks.1 is block 1, not 10-19")


class CheckpointConfig(_Section):
    every: int = Field(0, ge=0, description="checkpoint period in steps (0: only at the end)")
    keep_last: int = Field(2, ge=1, description="newest checkpoints kept")


class LoggingConfig(_Section):
    every: int = Field(10, ge=1, description="metrics.jsonl / TensorBoard / W&B period in steps")
    plot_every: int = Field(100, ge=1, description="loss.png period in steps")
    tensorboard: bool = Field(True, description="mirror the metrics to TensorBoard events")
    wandb: bool = Field(False, description="log to Weights & Biases when installed")
    wandb_project: str = "selfflow"
    peak_tflops: float | None = Field(None, gt=0, description="per-device peak for MFU (None: not reported)")


class EvalConfig(_Section):
    every: int = Field(0, ge=0, description="online evaluation period (0: off); needs an evaluator")
    num_samples: int = Field(200, ge=1, description="samples generated for each online evaluation")
    batch_size: int = Field(64, ge=1, description="online evaluation samples per sampler run and decode, per "
                            "rank (bounds its memory; the samples do not depend on it)")
    cfg_scale: float = Field(1.0, ge=0, description="guidance of the online evaluation's samples (1: none, as the "
                             "paper's metrics); the other sampler settings are each modality's resolved ones")
    evaluators: list[str] = Field(default_factory=list, description="evaluators run besides the modality's own "
                                  "(selfflow.evaluators entry points, e.g. linear_probe, inception_fid)")
    options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="keyword arguments of each evaluator by name, e.g. {inception_fid: "
        "{reference: ref_stats.npz, inception: pt_inception.pth}}")


class SampleConfig(SamplerSettings):
    """The run's sampler settings and its preview grids during training.

    A sampler key set here applies to every modality unless its mixture entry's ``sample`` sets it; a key set
    nowhere takes the modality's default (``Modality.default_sampler``, e.g. its training shift), then
    SamplerConfig's (euler, 50 steps, shift 1, cfg 1). :meth:`RunConfig.sampler` resolves the levels.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)  # as _Section's

    every: int = Field(0, ge=0, description="preview period in steps (0: only at the end)")
    num_samples: int = Field(64, ge=1, description="samples per grid written during training")
    seed: int = 1234
    use_ema: bool = True


# The config class of the backbone registered as ``model.arch`` (default mmdit; see .backbones), so plug-in
# backbones bring their own schema; serialised with all of that class's fields.
ModelConfig = Annotated[SerializeAsAny[BaseModel], BeforeValidator(validate_model_config)]


class RunConfig(_Section):
    name: str = "run"
    output_dir: str = "runs"
    model: ModelConfig = Field(default_factory=MMDiTConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    ema: EMAConfig = Field(default_factory=EMAConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    data: DataConfig = Field(default_factory=DataConfig)

    @field_validator("name")
    @classmethod
    def _name_inside_output_dir(cls, name: str) -> str:
        """The run directory (checkpoints, samples, metrics) must stay inside ``output_dir``."""
        parts = PurePosixPath(name.replace("\\", "/")).parts
        if (not name.strip() or "\0" in name or PurePosixPath(name).is_absolute()
                or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive or ".." in parts):
            raise ValueError("must be a non-empty relative path without '..' (the run directory is output_dir/name)")
        return name

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def sampler(self, modality: Modality) -> SamplerConfig:
        """``modality``'s sampler: its mixture entry's ``sample`` > the run's ``sample`` > the modality's
        ``default_sampler`` > SamplerConfig's defaults."""
        entry = next((e for e in self.data.entries() if e.modality == modality.name), None)
        levels = [modality.default_sampler, self.sample] + ([entry.sample] if entry is not None else [])
        try:
            return resolve_sampler(*levels)
        except ValidationError as e:  # settings each valid alone, not together (sde with steps: 1)
            raise ConfigError(f"sample settings of {modality.name!r}: {e.errors()[0]['msg']}") from None


# Keys that left ``train`` for the section of the component that reads them.
MOVED_KEYS = {
    "train.log_every": "logging.every",
    "train.plot_every": "logging.plot_every",
    "train.peak_tflops": "logging.peak_tflops",
    "train.wandb": "logging.wandb",
    "train.wandb_project": "logging.wandb_project",
    "train.checkpoint_every": "checkpoint.every",
    "train.keep_last": "checkpoint.keep_last",
    "train.sample_every": "sample.every",
    "train.eval_every": "eval.every",
    "train.eval_samples": "eval.num_samples",
}


def _moved_keys(raw: dict[str, Any]) -> list[str]:
    """``<old> moved to <new>`` for every moved key the config still uses."""
    out = []
    for old, new in MOVED_KEYS.items():
        section, key = old.split(".")
        if isinstance(raw.get(section), dict) and key in raw[section]:
            out.append(f"  {old} moved to {new}")
    return out


def short_repr(value: Any, limit: int = 120) -> str:
    """``repr(value)``, cut to ``limit`` characters: an error message never echoes a huge input. The cut is in
    the middle: the end of a path (the folder that differs) or of a list stays readable."""
    text = repr(value)
    head = limit // 2
    return text if len(text) <= limit else f"{text[:head]}…{text[head - limit:]} ({len(text)} characters)"


def validation_problems(err: ValidationError, root: str = "",
                        known: Callable[[tuple[Any, ...]], list[str]] | None = None) -> list[str]:
    """``key: problem (got value)`` for each error of ``err`` (``root`` names an error of the whole object);
    ``known(loc)``: the keys declared beside an unknown one, to say which it may have meant."""
    out = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or root
        if e["type"] == "extra_forbidden":
            # YAML reads {arch:dit} as the one key "arch:dit" (a mapping's colon needs a space after it)
            last = e["loc"][-1] if e["loc"] else ""
            glued = isinstance(last, str) and ":" in last and e["input"] is None
            name, _, value = str(last).partition(":")
            out.append(f"{key}: unknown key (value {short_repr(e['input'])})"
                       + (f" — YAML needs a space after a key's colon: write '{name}: {value}', not '{last}'"
                          if glued else did_you_mean(str(last), known(e["loc"]) if known else [])))
        else:
            out.append(f"{key}: {e['msg']} (got {short_repr(e['input'])})")
    return out


def _format_errors(err: ValidationError, source: str, raw: dict[str, Any]) -> str:
    return "\n".join([f"invalid config {source}:",
                      *(f"  {p}" for p in validation_problems(err, known=lambda loc: _declared_beside(loc, raw)))])


def _declared_beside(loc: tuple[Any, ...], raw: dict[str, Any]) -> list[str]:
    """The keys the config declares in the section of the key at ``loc``; the model section's are its arch's."""
    if loc[:1] != ("model",):
        return fields_along(RunConfig, loc[:-1])
    model = raw.get("model")
    try:
        spec = backbone_spec(model.get("arch", DEFAULT_ARCH) if isinstance(model, dict) else DEFAULT_ARCH)
    except (KeyError, TypeError):
        return []
    return fields_along(spec.config_cls, loc[1:-1])


def _arch_override_hint(err: ValidationError, overrides: list[str]) -> str:
    """``--set model.arch=X`` keeps the file's other model keys (a preset name, ``class_token`` …), written for
    another backbone: when X refuses them, say how to replace the section instead ("" when that is not it)."""
    archs = [value for path, value in map(parse_override, overrides) if path == ["model", "arch"]]
    if not archs or not any(e["loc"][:1] == ("model",) and e["loc"][1:2] != ("arch",) for e in err.errors()):
        return ""
    return (f"\n  (--set model.arch={archs[-1]} keeps the other keys of the model section, written for another "
            f"arch; replace the whole section instead: --set 'model={{arch: {archs[-1]}, …}}')")


def _nonfinite_floats(value: Any, key: str = "") -> list[str]:
    """``key: must be a finite number (got inf)`` for every NaN / ±inf float in a dumped config."""
    if isinstance(value, float) and not math.isfinite(value):
        return [f"  {key}: must be a finite number (got {value})"]
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list | tuple) else ()
    return [line for k, v in items for line in _nonfinite_floats(v, f"{key}.{k}" if key else str(k))]


# What a resume may not change: the checkpoint's weights and data positions only make sense for these.
# Everything else (train.steps, logging, eval, sample, checkpoint cadence, parallelism …) may change.
RESUME_FIXED_SECTIONS = ("model", "objective", "data")
# A mixture entry's sampler (samples only) and how batches reach the device (not which batches).
_RESUME_FREE_KEYS = re.compile(r"^data\.mixture\.\d+\.sample\.|^data\.pin_memory$")
_ABSENT = object()


def _flatten(value: Any, key: str, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(v, f"{key}.{k}", out)
    elif isinstance(value, list) and any(isinstance(v, dict) for v in value):  # data.mixture: entry by entry
        for i, v in enumerate(value):
            _flatten(v, f"{key}.{i}", out)
    else:
        out[key] = value
    return out


# What a resumed run's seed would have chosen continues from the checkpoint instead.
_RESUME_NOTES = {"train.seed": "no effect on a resumed run: its generator and data streams continue from the "
                               "checkpoint"}


def changed_settings(stored: dict[str, Any], current: dict[str, Any],
                     sections: tuple[str, ...] = ("train", "ema", "data"),
                     skip: tuple[str, ...] = ("train.steps",)) -> list[str]:
    """``train.batch_size 8 → 4`` for every key of ``sections`` that differs between a checkpoint's config and
    the current one — what the resume log says, so that a config.yaml rewritten with the new value is not the
    only trace of it. (Of ``data``, a resume lets only a few keys change: :func:`resume_conflicts`.)"""
    lines = []
    for section in sections:
        old = _flatten(stored.get(section, {}), section, {})
        new = _flatten(current.get(section, {}), section, {})
        for key in sorted(set(old) & set(new)):
            if key not in skip and old[key] != new[key]:
                note = f" ({_RESUME_NOTES[key]})" if key in _RESUME_NOTES else ""
                lines.append(f"{key} {short_repr(old[key], 60)} → {short_repr(new[key], 60)}{note}")
    return lines


# The keys that only choose the objective's settings: with the same resolved objectives they may differ.
_OBJECTIVE_KEYS = re.compile(r"^objective\.|^data\.mixture\.\d+\.(mask_ratio|timesteps)(\.|$)")


def flat_section(config: dict[str, Any], section: str) -> dict[str, Any]:
    """A dumped config's ``section`` as dotted keys: ``{"data.options.shards": …, "data.mixture.0.weight": …}``."""
    return _flatten(config.get(section, {}), section, {})


def location_entries(config: dict[str, Any], locations: dict[str, list[str]]) -> list[tuple[str, str, str]]:
    """``(key, modality, option)`` for each location option of each modality the dumped config trains
    (``locations``: modality → dotted option names, :func:`~selfflow.core.modality.location_options`): the key is
    ``data.options.<option>``, or ``data.mixture.<i>.options.<option>`` in a mixture."""
    data = config.get("data") or {}
    entries = [(f"data.mixture.{i}.options.", e.get("modality")) for i, e in enumerate(data.get("mixture") or [])]
    return [(prefix + name, modality, name) for prefix, modality in entries or [("data.options.", data.get("modality"))]
            for name in locations.get(modality, [])]


def location_keys(config: dict[str, Any], locations: dict[str, list[str]]) -> set[str]:
    """The dumped config's keys of the modalities' location options (:func:`location_entries`)."""
    return {key for key, _, _ in location_entries(config, locations)}


def resume_conflicts(stored: dict[str, Any], current: dict[str, Any], same_objectives: bool = False,
                     movable: Collection[str] = ()) -> list[str]:
    """``key (checkpoint A, now B)`` for every key of :data:`RESUME_FIXED_SECTIONS` that differs between a
    checkpoint's dumped config and the current one. A key the stored config lacks is a field added by a
    newer version and is not a conflict — unless it is a modality option (``…options.<key>``), where any
    new key changes the data. ``same_objectives``: every modality's objective resolved to the same settings
    (a key set to its default value, or unset where it was set to the default), so objective keys may differ.
    ``movable``: keys that say where the data lies (:func:`location_keys`), which may differ too: the data stream's
    state then checks that the data there is the data the run was reading."""
    lines = []
    for section in RESUME_FIXED_SECTIONS:
        old = _flatten(stored.get(section, {}), section, {})
        new = _flatten(current.get(section, {}), section, {})
        for key in sorted(set(old) | set(new)):
            a, b = old.get(key, _ABSENT), new.get(key, _ABSENT)
            if (a == b or (a is _ABSENT and ".options." not in key) or _RESUME_FREE_KEYS.match(key) or key in movable
                    or (same_objectives and _OBJECTIVE_KEYS.match(key))):
                continue
            shown = ["(unset)" if v is _ABSENT else "null (the default)" if v is None else short_repr(v, 60)
                     for v in (a, b)]
            lines.append(f"{key} (checkpoint {shown[0]}, now {shown[1]})")
    return lines


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=2e-4"`` → ``(["train", "lr"], 0.0002)``; the value is parsed as YAML. A list item is
    addressed by its index: ``data.mixture.0.batch_size=8`` (or ``data.mixture[0].batch_size=8``)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    key, value = text.split("=", 1)
    key = re.sub(r"\[(\d+)\]", r".\1", key)
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        parsed = parse_yaml(value, f"the value of override {key}") if value != "" else ""
    except YamlError as e:
        raise ConfigError(str(e)) from None
    return key.split("."), parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set ``key.path=value`` pairs in a nested dict (creating intermediate sections; a list's items are
    addressed by index)."""
    for text in overrides:
        path, value = parse_override(text)
        node: Any = raw
        for depth, part in enumerate(path):
            last = depth == len(path) - 1
            if isinstance(node, list):
                where = ".".join(path[:depth])
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"override {text!r}: {where} is a list of {len(node)} entries; address one "
                                      f"by its index 0…{len(node) - 1} ({where}.0…), got {part!r}")
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
                continue
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {'.'.join(path[:depth])!r} is a value, not a section")
            if last:
                node[part] = value
                break
            child = node.setdefault(part, {})
            if not isinstance(child, (dict, list)):
                raise ConfigError(f"override {text!r}: {part!r} is a value, not a section")
            node = child
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | str | None = None, *,
                for_inference: bool = False) -> RunConfig:
    """Load a YAML run config (or the defaults) and apply overrides (``"key.path=value"`` strings, or one);
    errors name key, value and file. ``for_inference``: the config of a trained model loaded to sample,
    evaluate or export, where an ``objective.kind`` that is not installed here is accepted."""
    if isinstance(overrides, str):
        overrides = [overrides]
    raw: dict[str, Any] = {}
    source = "(defaults)"
    if path is not None:
        path = Path(path)
        source = str(path)
        if path.is_dir():
            raise ConfigError(f"config file {path} is a directory, not a YAML file")
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = parse_yaml(path.read_bytes().decode("utf-8"), f"config file {path}")
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                              f"{e.start}): is it a YAML file?") from None
        except (YamlError, OSError) as e:
            raise ConfigError(str(e)) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        raw = loaded or {}
    if overrides:
        raw = apply_overrides(raw, overrides)
        source += " with overrides " + " ".join(o if len(o) <= 120 else short_repr(o) for o in overrides)
    moved = _moved_keys(raw)
    if moved:
        raise ConfigError("\n".join([f"invalid config {source}:", *moved]))
    try:
        cfg = RunConfig.model_validate(raw, context={UNKNOWN_KIND_OK: for_inference})
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source, raw) + _arch_override_hint(e, overrides or [])) from None
    nonfinite = _nonfinite_floats(cfg.model_dump())
    if nonfinite:
        raise ConfigError("\n".join([f"invalid config {source}:", *nonfinite]))
    return cfg


# build_model_config overrides these model fields whatever the config says, so a saved config keeps the values
# asked for (it is the input a resume compares and reruns read, old checkpoints included) and says so here.
SAVED_CONFIG_NOTE = """\
# The model's num_classes, modalities and context_dim are taken from the data when the model is built, whatever
# is written below, and its projector_mult is set to 0 when the objective needs no projector. The built values:
# model_config in pretrained/config.json (written with ema.safetensors at the end of training).
"""


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write ``cfg`` as YAML, every default filled in, under :data:`SAVED_CONFIG_NOTE`."""
    atomic_write_text(path, SAVED_CONFIG_NOTE + yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
