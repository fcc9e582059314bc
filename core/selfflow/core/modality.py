"""The contract a modality package fulfils to plug into the trainer and samplers.

A modality owns everything specific to its media: options (a pydantic model, validated from the run
config's ``data.options``), its data stream, its codec (media ↔ latents), its token layout (latents ↔
:class:`Tokens`), its defaults for Self-Flow (mask ratio R_M, timestep distribution) and for sampling, and how
samples are written (PNG grids, MP4, WAV). Core never branches on a modality's name.
"""

from __future__ import annotations

import logging
import numbers
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, ClassVar, Union

import numpy as np
import torch
from pydantic import BaseModel, Discriminator, Field, Tag, TypeAdapter
from pydantic_core import PydanticSerializationError, PydanticUndefined

from .atomic import atomic_write_text
from .sampler import SamplerSettings
from .timesteps import TimestepDistribution
from .token_schedule import TokenSchedule
from .tokens import Conditioning, Tokens
from .undeclared_keys import undeclared_keys

Batch = dict[str, torch.Tensor]


def sample_indices(samples: int | torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """The indices ``(N,)`` long on ``device`` that :meth:`Modality.sample_conditions` is given as ``samples``."""
    if isinstance(samples, numbers.Integral):  # a count (numpy's integers too), not one index
        return torch.arange(int(samples), device=device)
    return torch.as_tensor(samples, dtype=torch.long).flatten().to(device)


class DataStream(ABC):
    """An endless, resumable iterator of batches for one rank.

    ``state_dict()`` captures the position so that a resumed run sees exactly the batches an uninterrupted
    run would have seen next — no sample twice, none skipped.
    """

    @abstractmethod
    def __iter__(self) -> Iterator[Batch]: ...

    @abstractmethod
    def state_dict(self) -> dict[str, Any]: ...

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def options_union(key: str, default: str, *models: type[BaseModel]) -> Any:
    """One options model per value of ``key`` (e.g. per ``dataset``): each model declares ``key`` as a
    ``Literal`` of its value(s), and an option that does not belong to the chosen model is an error naming
    it (``latent_shards.data_seed: Extra inputs are not permitted``). ``key`` may be omitted: ``default``."""
    tags = {}
    for model in models:
        for value in model.model_fields[key].annotation.__args__:  # Literal["a", "b"] → ("a", "b")
            tags[value] = model

    def tag(value: Any) -> str:
        chosen = value.get(key, default) if isinstance(value, dict) else getattr(value, key, default)
        if not isinstance(chosen, str) or chosen not in tags:
            raise ValueError(f"{key} must be one of {sorted(tags)}, got {chosen!r}")
        return chosen

    return Annotated[Union[tuple(Annotated[tags[v], Tag(v)] for v in tags)], Discriminator(tag)]  # noqa: UP007


class Modality(ABC):
    """Base class of modalities; subclasses set the class attributes and implement the methods."""

    name: ClassVar[str]
    # a pydantic model, or a union of them keyed by a field (see :func:`options_union`)
    Options: ClassVar[Any]
    default_mask_ratio: ClassVar[float]
    # a subclass may make it a property when it depends on the options (image: on the codec)
    default_timesteps: ClassVar[TimestepDistribution] = TimestepDistribution()
    # the lowest level of sampler settings, under the run's ``sample`` and the mixture entry's ``sample``
    # (e.g. the training shift); unset fields keep SamplerConfig's defaults
    default_sampler: ClassVar[SamplerSettings] = SamplerSettings()

    def __init__(self, options: dict[str, Any] | BaseModel | None = None):
        if isinstance(options, BaseModel):
            options = options.model_dump()
        self.options = TypeAdapter(self.Options).validate_python(options or {})
        model = type(self.options)
        if isinstance(self.options, BaseModel) and (unknown := undeclared_keys(model, options)):
            raise ValueError(f"unknown option(s) {', '.join(unknown)} of modality {self.name!r}; its options: "
                             f"{', '.join(sorted(model.model_fields))}")

    # --- shapes -----------------------------------------------------------------------------------
    @property
    @abstractmethod
    def token_channels(self) -> int:
        """Channels ``C`` of one token (what the backbone's input projection takes)."""

    @property
    def num_classes(self) -> int:
        """Number of class labels (0: not class-conditional)."""
        return 0

    @property
    def class_names(self) -> list[str]:
        return []

    @property
    def evaluator(self) -> str | None:
        """Name of the online evaluator suited to this modality's data (``selfflow.evaluators``), if any."""
        return None

    @property
    def context_dim(self) -> int:
        """Width ``Dc`` of the text context ``(B, Lc, Dc)`` this modality conditions on (0: no text).

        The trainer builds the backbone's context stream with this width; a text-conditioned modality's
        :meth:`encode` returns ``Conditioning(context, context_mask)`` and its :meth:`sample_conditions`
        the captions' context plus a null (empty-caption) context for CFG.
        """
        return 0

    # --- token roles (optional hook) ---------------------------------------------------------------
    def token_schedule(self) -> TokenSchedule | None:
        """Token groups and per-sample schedule modes (:mod:`selfflow.core.token_schedule`), or ``None``.

        For modalities whose tokens play different roles in one sequence (a robot policy's context frame,
        future frames and actions): the objective then draws a mode per sample (independent / shared /
        one group at pure noise / …), averages the flow-matching loss per group with the groups' weights
        and logs ``loss_fm_<group>``. ``None`` (the default) keeps the plain objective, bit for bit.
        """
        return None

    def token_groups(self, tokens: Tokens) -> torch.Tensor | None:
        """Each token's group ``(L,)`` long, an index into ``token_schedule().groups`` (the same layout for
        every sample of the batch); ``None`` when :meth:`token_schedule` is ``None``."""
        return None

    # --- data -------------------------------------------------------------------------------------
    @abstractmethod
    def stream(self, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> DataStream:
        """This rank's share of the training stream (``batch_size`` per rank)."""

    @abstractmethod
    def encode(self, batch: Batch, device: torch.device | str) -> tuple[Tokens, Conditioning]:
        """Media batch → tokens and conditioning on ``device``. The trainer passes the batch already on
        ``device`` (:func:`~selfflow.core.data.pinning.batch_to_device`); other callers pass CPU batches."""

    # --- sampling ---------------------------------------------------------------------------------
    def sample_conditions(self, samples: int | torch.Tensor, device: torch.device | str
                          ) -> tuple[Conditioning, Conditioning | None, torch.Tensor | None]:
        """Conditioning of preview samples, its null version for CFG, and display labels. ``samples``: the
        samples' indices ``(N,)``, or ``n`` for samples ``0…n−1``.

        Sample ``i``'s conditioning depends on ``i`` alone, not on which samples are made with it, so that a set
        made in batches, or in shares on several ranks, is the set made at once (and a batch encodes only its
        own). The default cycles through the classes (sample ``i`` gets class ``i mod num_classes``) so a grid
        shows one class per column; unconditional modalities return empty conditionings.
        """
        if not self.num_classes:
            return Conditioning(), None, None
        labels = sample_indices(samples, device) % self.num_classes
        return (Conditioning(labels=labels), Conditioning(labels=torch.full_like(labels, self.num_classes)),
                labels)

    def prompt_conditions(self, prompts: list[str], device: torch.device | str
                          ) -> tuple[Conditioning, Conditioning]:
        """Conditioning for one sample per prompt and its null (the empty caption) for CFG; text-conditioned
        modalities (``context_dim > 0``) implement it."""
        raise NotImplementedError(f"modality {self.name!r} cannot be conditioned on prompts")

    @abstractmethod
    def sample_ids(self, n: int, device: torch.device | str) -> torch.Tensor:
        """Token positions ``(n, L, 3)`` of one generated sample layout."""

    @abstractmethod
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Generated tokens ``(B, L, C)`` → media in this modality's natural range."""

    @abstractmethod
    def save_samples(self, media: torch.Tensor, labels: torch.Tensor | None, path: Path) -> Path:
        """Write decoded samples (a PNG grid, MP4s, WAVs …) at ``path`` plus the writer's suffix and return the file
        written. Core creates ``path``'s folder first."""

    def write_captions(self, labels: torch.Tensor, path: Path) -> Path:
        """``<path>.txt`` beside a preview: one ``i: <class name or caption of labels[i]>`` line per sample."""
        names = self.class_names
        return atomic_write_text(Path(path).with_suffix(".txt"),
                                 "".join(f"{i}: {names[int(k)]}\n" for i, k in enumerate(labels)))

    # --- many samples (``selfflow sample --num N``) -----------------------------------------------------
    def write_sample(self, media: torch.Tensor, label: int | None, path: Path) -> Path:
        """Write one decoded sample (no batch dimension) at ``path`` plus a suffix; return the file.
        The default uses the batch writer on a batch of one; modalities override it with a native file.

        ``selfflow sample --out-dir`` keeps only the returned file: it writes in a staging folder, moves
        that file out and deletes the folder with anything else the writer put there (a preview, a
        sidecar), so put all a sample needs in the one file."""
        labels = None if label is None else torch.tensor([label])
        return self.save_samples(media[None], labels, path)

    def evaluation_array(self, media: torch.Tensor) -> np.ndarray | None:
        """Decoded batch → the array ``selfflow sample --out-dir`` stacks into ``samples_N.npz`` for an
        evaluator: images give uint8 ``(B, H, W, 3)`` (ADM's ``arr_0``); another modality may return its own
        layout, as long as the first axis is the batch. ``None`` when this modality has no such format."""
        return None

    def evaluation_hint(self, out_dir: Path, npz: Path | None, paired: bool) -> str | None:
        """The ``selfflow eval`` command that scores samples written by ``selfflow sample --out-dir`` to
        ``out_dir`` (``npz``: the ``samples_N.npz`` written, if any; ``paired``: a ``prompts.jsonl`` pairs
        them with prompts), printed after sampling; ``None``: no suggestion."""
        return None


def preview_conditions(modality: Modality, samples: int | torch.Tensor, device: torch.device | str
                       ) -> tuple[Conditioning, Conditioning | None, torch.Tensor | None]:
    """``modality.sample_conditions(samples, device)``, checked: what it returns has one row per sample.

    Core calls a modality's preview conditioning only through here, so that a plug-in that breaks the contract
    (reads ``samples`` as a count when given indices, returns a fixed-size set) is an error naming the modality
    and the field, not a shape mismatch inside the backbone's embedding."""
    n = len(sample_indices(samples, "cpu"))
    cond, null, shown = modality.sample_conditions(samples, device)
    fields = [(f"conditioning.{key}", value) for key, value in cond if value is not None]
    if null is not None:
        fields += [(f"null conditioning.{key}", value) for key, value in null if value is not None]
    if shown is not None:
        fields.append(("display labels", shown))
    for what, value in fields:
        if value.ndim == 0 or value.shape[0] != n:
            raise ValueError(f"modality {modality.name!r}: sample_conditions gave {what} of shape "
                             f"{tuple(value.shape)} for {n} samples; it must return one row per sample, sample i's "
                             "depending on i alone (see Modality.sample_conditions)")
    return cond, null, shown


def check_layout(modality: Modality) -> None:
    """Refuse a modality whose token layout the backbone could not take, naming the modality and the member:
    ``token_channels`` a positive int, ``sample_ids(1, "cpu")`` integer positions ``(1, L, 3)``. Run when a run is
    built, so a plug-in's mistake stops it before training rather than at its first preview."""
    channels = modality.token_channels
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ValueError(f"modality {modality.name!r}: token_channels must be a positive int (C of the tokens "
                         f"(B, L, C) that encode returns), got {channels!r}")
    ids = modality.sample_ids(1, "cpu")
    if (not isinstance(ids, torch.Tensor) or ids.ndim != 3 or ids.shape[0] != 1 or ids.shape[2] != 3
            or ids.shape[1] < 1 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool):
        got = f"{tuple(ids.shape)} {ids.dtype}" if isinstance(ids, torch.Tensor) else repr(ids)
        raise ValueError(f"modality {modality.name!r}: sample_ids(1, 'cpu') must give integer token positions "
                         f"(1, L, 3) — (t, h, w) of each of the L tokens; got {got}")


def open_stream(modality: Modality, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> DataStream:
    """``modality.stream(…)``, refused unless it is resumable: a checkpoint stores its ``state_dict()``, so a plain
    generator would train and then fail at the first checkpoint."""
    stream = modality.stream(batch_size, seed, rank, world_size)
    if not all(callable(getattr(stream, m, None)) for m in ("__iter__", "state_dict", "load_state_dict")):
        raise ValueError(f"modality {modality.name!r}: stream() must return a DataStream (iterable, with "
                         f"state_dict and load_state_dict: a checkpoint records the data position; "
                         f"data.indexed_stream.IndexedStream makes one from render(indices)), got "
                         f"{type(stream).__name__}")
    return stream


def options_record(modality: Modality) -> dict[str, Any]:
    """The modality's options with every default filled, as JSON values — what checkpoints keep, so that a resume
    sees a default changed in the modality's code ({} when an option does not serialize)."""
    options = modality.options
    if not isinstance(options, BaseModel):
        return {}
    try:
        return options.model_dump(mode="json")
    except PydanticSerializationError:
        return {}


def data_location(description: str, default: Any = PydanticUndefined) -> Any:
    """An option field that says *where* a modality's prepared data lies (a folder, or a glob), not what it
    is. A resume accepts it changed — the data moved to another disk, or was copied to a node's scratch — and
    lets the data stream's state judge whether the shards there are the ones the run was reading
    (:class:`~selfflow.core.data.shard_stream.ShardStream` refuses others)."""
    return Field(default, description=description, json_schema_extra={"data_location": True})


def model_location(description: str, default: Any = None) -> Any:
    """An option field that says where a model the modality reads lies (a VAE, a text or REPA encoder folder).
    A resume accepts it changed when the folder there holds the same files as when the checkpoint was written
    (:func:`~selfflow.core.model_folders.files_fingerprint`, kept in every checkpoint) — the weights were
    copied to another cluster or disk — and refuses other weights."""
    return Field(default, description=description, json_schema_extra={"model_location": True})


def cache_location(description: str, default: Any = None) -> Any:
    """An option field that says where a cache lies (its entries are keyed by what they hold): a resume accepts
    it changed, with no check."""
    return Field(default, description=description, json_schema_extra={"cache_location": True})


def _marked_options(options: Any, markers: tuple[str, ...], prefix: str = "") -> list[str]:
    """The dotted names of the option fields carrying one of ``markers``, nested option models included."""
    if not isinstance(options, BaseModel):
        return []
    names = []
    for name, f in type(options).model_fields.items():
        extra = f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {}
        if any(extra.get(m) for m in markers):
            names.append(prefix + name)
        names += _marked_options(getattr(options, name, None), markers, f"{prefix}{name}.")
    return names


def options_locations(options: Any) -> list[str]:
    """The dotted names of every option of ``options`` that says where something lies on this machine (data,
    a model folder, a cache): what may point elsewhere when a trained model is used on another machine."""
    return _marked_options(options, ("data_location", "model_location", "cache_location"))


def location_options(modality: Modality) -> list[str]:
    """The dotted names of the modality's :func:`data_location` and :func:`cache_location` options: a resume
    lets them change."""
    return _marked_options(modality.options, ("data_location", "cache_location"))


def model_location_options(modality: Modality) -> list[str]:
    """The dotted names of the modality's :func:`model_location` options (``vae_path``, ``text.model_dir``)."""
    return _marked_options(modality.options, ("model_location",))


def check_first_batch(modality: Modality, tokens: Tokens, cond: Conditioning) -> None:
    """Check what :meth:`Modality.encode` gave against what the modality declares, naming the modality: tokens of
    ``token_channels`` channels (the backbone's input projection is sized by it), and class labels in
    ``0…num_classes − 1``. The backbone accepts ``num_classes`` too — the null label, which training itself sets
    for classifier-free guidance — so labels counted from 1 would train without an error, the last class merged
    with "unconditional". A token count other than ``sample_ids``' is only warned about: a modality may train on
    other lengths than it samples, but its previews and samples take ``sample_ids``' layout, which ``decode`` must
    then accept. The trainer asks on each session's first batch of a modality (a device sync there, not on every
    step)."""
    channels, length = tokens.x.shape[-1], tokens.x.shape[1]
    if channels != modality.token_channels:
        raise ValueError(f"modality {modality.name!r}: encode gave tokens {tuple(tokens.x.shape)} of {channels} "
                         f"channels, but token_channels is {modality.token_channels} (the backbone's input "
                         "projection is sized by token_channels)")
    k, labels = modality.num_classes, cond.labels
    if k and labels is None and cond.context is None:
        raise ValueError(f"modality {modality.name!r}: num_classes is {k}, but encode gave no class labels "
                         "(Conditioning(labels=...), (B,) integers): the model is class-conditional")
    if k and labels is not None and labels.numel():
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= k:
            raise ValueError(f"modality {modality.name!r}: encode gave class labels in {low}…{high}, outside "
                             f"0…{k - 1} (num_classes = {k}; {k} is the null label that training sets itself for "
                             "guidance)")
    if length != (sampled := modality.sample_ids(1, "cpu").shape[1]):
        logging.getLogger("selfflow").warning(
            "selfflow: warning: modality %r: encode gave %d tokens per sample, sample_ids %d; previews and samples "
            "take sample_ids' layout, so decode must accept it", modality.name, length, sampled)
