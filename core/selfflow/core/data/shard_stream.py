"""Reading shards: the one resumable stream every modality's prepared data goes through.

Each epoch the shard list is ordered by ``sha256(seed/epoch/name)`` (the same order on every rank), where a
shard's name is its path below the folder all the shards share, so that moving the data (another clone, another
disk) keeps the run's data order; rank
``r`` of ``W`` reads shards ``r, r+W, …``, and its data-loader workers split those again. Samples may pass
through a seeded shuffle buffer. A modality's :data:`~selfflow.core.data.shard_format.Decoder` turns the
raw members into a sample.

**One skip policy.** Whatever is corrupt is skipped, counted in :attr:`ShardStream.skipped` and logged
with the shard URL and the sample key — never raised: a member that is garbage, a pickled object array, of
the wrong dtype or shape, non-finite (NaN moments skip the sample, not the step), a class label that is not
an integer in range, a missing field (all raised by the decoder), a truncated tar (the samples after the
cut are lost) and a shard that cannot be read at all. A lost shard counts as all the samples its
``.json`` report says it holds (one when there is no report) and also in :attr:`ShardStream.lost_shards`,
so the trainer's ``train.max_bad_data_fraction`` (judged from ``skipped``) trips when much of the data is
unreadable.

**Position** = (epoch, events consumed in the epoch), where an event is one sample or one skip, in the
deterministic order the (possibly multi-worker) reader produces them: resuming replays the epoch up to
that point without re-counting its skips, and continues with the same batches. A position only means something
in the same shards, so the state keeps each shard's name and size (:func:`shard_sizes`) and a resume on other
shards is refused — wherever they lie: the same shards in another folder resume.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, Field
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..modality import DataStream
from ..stop_request import ignore_stop_signals, iterate_signal_ignoring_loader
from .shard_format import Decoder, Sample, collate_samples, decode_sample
from .tar_members import Unsupported, iter_members

log = logging.getLogger("selfflow.shards")


class ShardReadOptions(BaseModel):
    """How a modality's ``latent_shards`` options read their shards (mixed into each modality's options)."""

    num_workers: int = Field(0, ge=0, description="data-loader workers per rank")
    shuffle_buffer: int = Field(1000, ge=0, description="samples each worker mixes before handing one out "
                                "(0: shard order; memory ≈ buffer × one stored sample per worker)")


@dataclass(frozen=True)
class Skip:
    """A skip event: ``lost`` samples of ``url`` (at ``key``) could not be used, because of ``error``."""

    url: str
    key: str
    error: str
    lost: int = 1
    whole_shard: bool = False


def split_by_rank(urls: list[str], rank: int, world_size: int) -> list[str]:
    """Rank ``rank``'s shards; fewer shards than ranks is an error."""
    if len(urls) < world_size:
        raise ValueError(f"{len(urls)} shard(s) cannot be split over {world_size} ranks: write more "
                         "shards (prepare --shard-size smaller) or use fewer ranks")
    return urls[rank::world_size]


# How an epoch's shard order names the shards, recorded in the stream's state: checkpoints written before the
# order stopped depending on where the data lies say nothing, and keep their full-path order when resumed.
BELOW_SHARED_FOLDER, FULL_PATH = "path below the shards' shared folder", "full path"


def shard_names(urls: list[str], order: str = BELOW_SHARED_FOLDER) -> dict[str, str]:
    """Each shard's path below the deepest folder all of ``urls`` share: what the epoch order hashes. Hashing the
    URL itself (``order`` :data:`FULL_PATH`, kept for older checkpoints) tied the order, and so every number of a
    run, to where the data happened to lie."""
    if order == FULL_PATH:
        return {u: u for u in urls}
    paths = [os.path.abspath(u) for u in urls]
    root = os.path.commonpath([os.path.dirname(p) for p in paths])
    return {u: os.path.relpath(p, root) for u, p in zip(urls, paths)}


def shard_sizes(urls: list[str]) -> dict[str, int | None]:
    """Each shard's :func:`shard_names` name → its size in bytes (None: not a local file — gone, or a URL): what
    tells the data a run was reading from other data, wherever it lies."""
    names = shard_names(urls)
    return {names[u]: os.path.getsize(u) if "://" not in u and os.path.isfile(u) else None for u in urls}


def changed_shards(then: dict[str, int | None], now: dict[str, int | None]) -> str | None:
    """How the shards ``now`` differ from those a checkpoint was reading (None: the same data). A shard gone
    since is no difference: the reader counts its samples as lost, as for any missing shard."""
    if set(then) != set(now):
        added, gone = sorted(set(now) - set(then)), sorted(set(then) - set(now))
        return (f"{len(then)} shards then, {len(now)} now" + (f"; new: {', '.join(added[:3])}" if added else "")
                + (f"; not there: {', '.join(gone[:3])}" if gone else ""))
    resized = [f"{n} ({then[n]} bytes then, {now[n]} now)" for n in sorted(now)
               if None not in (then[n], now[n]) and then[n] != now[n]]
    return f"other contents: {', '.join(resized[:3])}" if resized else None


def _expected_samples(url: str) -> int | None:
    """The sample count the writer's ``.json`` report gives for a shard (None when there is none)."""
    try:
        return int(json.loads(Path(url).with_suffix(".json").read_text())["samples"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _split_name(name: str) -> tuple[str, str]:
    """webdataset naming: ``dir/key.field.ext`` → (``dir/key``, ``field.ext``)."""
    head, _, base = name.rpartition("/")
    stem, _, field = base.partition(".")
    return (f"{head}/{stem}" if head else stem), field


def _tar_members(url: str) -> Iterator[tuple[str, bytes]]:
    """``(name, bytes)`` of a shard's files: the fast reader for the layouts our writers produce, tarfile
    for any other (it raises :class:`Unsupported` before yielding anything)."""
    try:
        yield from iter_members(url)
    except Unsupported:
        with tarfile.open(url, "r|*") as tar:
            for member in tar:
                if member.isfile():
                    yield member.name, tar.extractfile(member).read()


def read_shard(url: str) -> Iterator[Sample | Skip]:
    """The raw samples (``__key__``, ``__url__`` and one bytes entry per field) of one tar, and a
    :class:`Skip` for the samples lost when the tar is unreadable or truncated (a truncation at a member
    boundary reads as a clean end: the writer's report tells that samples are missing)."""
    seen, key, current = 0, "?", None
    try:
        for name, data in _tar_members(url):
            key, field = _split_name(name)
            if current is not None and current["__key__"] != key:
                seen += 1
                yield current
                current = None
            if current is None:
                current = {"__key__": key, "__url__": url}
            current[field] = data
        if current is not None:
            seen += 1
            yield current
    except (OSError, EOFError, tarfile.TarError, ValueError) as e:
        # the incomplete sample at the cut is lost too; a report tells how many more were expected
        lost = max(1, (_expected_samples(url) or 0) - seen)
        yield Skip(url, key, f"unreadable shard: {type(e).__name__}: {e}", lost, whole_shard=seen == 0)
        return
    expected = _expected_samples(url)
    if expected is not None and seen < expected:
        yield Skip(url, key, f"truncated shard: {seen} of the {expected} samples its report lists",
                   expected - seen, whole_shard=seen == 0)


@dataclass(frozen=True)
class Decoded:
    """A sample event: the decoded ``sample`` of ``key`` in shard ``url``."""

    url: str
    key: str
    sample: Sample


WORKER_CHUNK = 64  # events per message from a data-loader worker: one queue round trip each, not per sample


class _EpochReader(IterableDataset):
    """One rank's epoch as events (decoded samples and :class:`Skip`), each worker reading a slice of the
    shards; picklable, so it runs in data-loader workers."""

    def __init__(self, urls: list[str], decode: Decoder, epoch: int, seed: int, shuffle_buffer: int):
        super().__init__()
        self.urls, self.decode, self.epoch = urls, decode, epoch
        self.seed, self.shuffle_buffer = seed, shuffle_buffer

    def _decoded(self, raw: Sample) -> Decoded | Skip:
        try:
            return Decoded(raw["__url__"], raw["__key__"], self.decode(raw, self.epoch))
        except Exception as e:  # any decoder error means a corrupt sample: skip it, keep the run going
            return Skip(raw["__url__"], raw["__key__"], f"{type(e).__name__}: {e}")

    def __iter__(self) -> Iterator[Decoded | Skip]:
        info = get_worker_info()
        if info is None:
            return self._events(0, 1)
        return _chunks(map(_to_wire, self._events(info.id, info.num_workers)), WORKER_CHUNK)

    def _events(self, wid: int, nw: int) -> Iterator[Decoded | Skip]:
        rng = random.Random(f"{self.seed}/{self.epoch}/{wid}")
        buffer: list[Sample] = []
        for url in self.urls[wid::nw]:
            for raw in read_shard(url):
                if isinstance(raw, Skip):
                    yield raw
                elif self.shuffle_buffer <= 1:
                    yield self._decoded(raw)
                else:
                    buffer.append(raw)
                    if len(buffer) >= self.shuffle_buffer:
                        yield self._decoded(buffer.pop(rng.randrange(len(buffer))))
        rng.shuffle(buffer)
        for raw in buffer:
            yield self._decoded(raw)


def _chunks(events: Iterator[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for event in events:
        chunk.append(event)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _to_wire(event: Decoded | Skip) -> Decoded | Skip:
    """A worker's event with its tensors as numpy arrays: pickled through the pipe in one copy, where a torch
    tensor would be moved into its own shared-memory segment (~10× slower for small tensors)."""
    if isinstance(event, Skip):
        return event
    tensors = [k for k, v in event.sample.items() if isinstance(v, torch.Tensor)]
    sample = {**event.sample, **{k: event.sample[k].numpy() for k in tensors}, _WIRE_TENSORS: tensors}
    return Decoded(event.url, event.key, sample)


def _from_wire(event: Decoded | Skip) -> Decoded | Skip:
    if isinstance(event, Skip):
        return event
    sample = dict(event.sample)
    for k in sample.pop(_WIRE_TENSORS):
        sample[k] = torch.from_numpy(sample[k])
    return Decoded(event.url, event.key, sample)


_WIRE_TENSORS = "__tensors__"


def _as_is(chunk: Any) -> Any:
    return chunk  # the loader hands chunks of events over as they are (no tensor conversion)


def missing_shards(urls: list[str]) -> list[str]:
    """The shards whose writer's ``.json`` report lies beside ``urls`` but whose ``.tar`` is gone from the disk
    (deleted, lost in a copy). They stay in the stream's list, so that the reader counts their samples as lost,
    each epoch, as for an unreadable shard: dropping them from the listing lost them without a word."""
    gone = []
    for folder in sorted({Path(u).parent for u in urls if "://" not in u}):
        for report in sorted(folder.glob("*-[0-9][0-9][0-9][0-9][0-9][0-9].json")):
            if not (tar := report.with_suffix(".tar")).exists():
                gone.append(str(tar))
    if gone:
        log.warning("%d shard(s) listed by their reports are missing (%s%s): their samples count as skipped",
                    len(gone), ", ".join(Path(g).name for g in gone[:3]), " …" if len(gone) > 3 else "")
    return gone


class ShardStream(DataStream):
    """Endless batches ``collate(list of decoded samples)`` from ``urls`` for one rank (see module doc).

    ``decode``: raw members and epoch → sample (default: the common latent / caption / label fields);

    ``shape_key``: the decoded field whose shape must equal the first good sample's (None: no check);
    ``num_workers``: data-loader worker processes (0: decode in this process).
    """

    def __init__(self, urls: list[str], batch_size: int,
                 collate: Callable[[list[Sample]], dict] = collate_samples, seed: int = 0, rank: int = 0,
                 world_size: int = 1, *, decode: Decoder = decode_sample, shape_key: str | None = "latent", num_workers: int = 0, shuffle_buffer: int = 0):
        if not urls:
            raise FileNotFoundError("no shards found (run `selfflow prepare …` first, and check data.options.shards)")
        urls = [*urls, *missing_shards(urls)]
        self.urls, self.batch_size, self.collate, self.decode = sorted(urls), batch_size, collate, decode
        self._order = BELOW_SHARED_FOLDER
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shape_key, self.num_workers, self.shuffle_buffer = shape_key, num_workers, shuffle_buffer
        split_by_rank(self.urls, rank, world_size)  # fail early with a clear message
        self.sizes = shard_sizes(self.urls)  # kept with the position: a resume checks that it reads the same data
        self.epoch = self.consumed = 0
        self.skipped = self.lost_shards = 0  # cumulative; the trainer reads ``skipped``
        self._at_position = (0, 0)  # (skipped, lost_shards) at the last yielded batch: what a resume restores
        self.shape: tuple[int, ...] | None = None

    def epoch_shards(self, epoch: int) -> list[str]:
        """This rank's shards of ``epoch``, in reading order."""
        names = shard_names(self.urls, self._order)
        order = sorted(self.urls, key=lambda u: hashlib.sha256(f"{self.seed}/{epoch}/{names[u]}".encode()).digest())
        return split_by_rank(order, self.rank, self.world_size)

    def _epoch_events(self, epoch: int) -> Iterator[Decoded | Skip]:
        reader = _EpochReader(self.epoch_shards(epoch), self.decode, epoch, self.seed, self.shuffle_buffer)
        workers = min(self.num_workers, len(reader.urls))
        if workers == 0:
            return iter(reader)
        loader = DataLoader(reader, batch_size=None, num_workers=workers, collate_fn=_as_is,
                            worker_init_fn=ignore_stop_signals)
        return (_from_wire(event) for chunk in iterate_signal_ignoring_loader(loader) for event in chunk)

    def _skip(self, event: Skip) -> None:
        self.skipped += event.lost
        self.lost_shards += event.whole_shard
        log.warning("skipping %d corrupt sample(s) (shard %s, key %s): %s", event.lost, event.url, event.key,
                    event.error)

    def _shape_error(self, event: Decoded) -> Skip | None:
        if self.shape_key is None:
            return None
        shape = tuple(event.sample[self.shape_key].shape)
        if self.shape is None:
            self.shape = shape
        elif shape != self.shape:
            return Skip(event.url, event.key, f"{self.shape_key} shape {shape} differs from the stream's {self.shape}")
        return None

    def __iter__(self) -> Iterator[dict]:
        while True:
            batch: list[Sample] = []
            produced, whole_epoch = 0, self.consumed == 0
            for i, event in enumerate(self._epoch_events(self.epoch)):
                if i < self.consumed:  # replayed: read before the resume (a checkpoint without the reference
                    if self.shape is None and isinstance(event, Decoded):  # shape: take it here, as before)
                        self._shape_error(event)
                    continue
                if not isinstance(event, Skip):
                    event = self._shape_error(event) or event
                if isinstance(event, Skip):
                    self._skip(event)
                    continue
                batch.append(event.sample)
                produced += 1
                if len(batch) == self.batch_size:
                    self.consumed = i + 1
                    self._at_position = (self.skipped, self.lost_shards)
                    yield self.collate(batch)
                    batch = []
            if whole_epoch and produced < self.batch_size:  # every later epoch would read the same: a hang
                # a ValueError: the data or the batch size to fix, one `selfflow: error:` line (not a traceback)
                raise ValueError(
                    f"rank {self.rank} read {produced} valid sample(s) in a whole epoch of its "
                    f"{len(self.epoch_shards(self.epoch))} shard(s), fewer than one batch of {self.batch_size} "
                    f"({self.skipped} corrupt samples skipped, {self.lost_shards} shards lost): use more data, "
                    "a smaller batch or fewer ranks")
            self.epoch, self.consumed = self.epoch + 1, 0  # a partial last batch is dropped

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "consumed": self.consumed, "skipped": self._at_position[0],
                "lost_shards": self._at_position[1], "world_size": self.world_size,
                "batch_size": self.batch_size, "num_workers": self.num_workers,
                "shuffle_buffer": self.shuffle_buffer,
                "shape": None if self.shape is None else list(self.shape),
                "shard_order": self._order, "shard_sizes": self.sizes}

    def split(self) -> tuple[int, int, int]:
        """How the data is divided: (ranks, batch per rank, data-loader workers). A position means something
        only under the split it was read with."""
        return self.world_size, self.batch_size, self.num_workers

    @staticmethod
    def split_of(state: dict[str, Any]) -> tuple[int, int, int]:
        """:meth:`split` of the stream that wrote ``state`` (checkpoints from before workers were kept: 0)."""
        return state["world_size"], state["batch_size"], state.get("num_workers", 0)

    def resumes_exactly(self, state: dict[str, Any]) -> bool:
        """Whether ``state``'s position carries over as it is: read under this split and shuffle buffer."""
        return (self.split_of(state) == self.split()
                and state.get("shuffle_buffer", self.shuffle_buffer) == self.shuffle_buffer)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        was = self.split_of(state)
        if was != self.split():
            raise ValueError(f"cannot resume a shard stream split otherwise (was {was[0]}×{was[1]}, {was[2]} workers; "
                             f"now {self.world_size}×{self.batch_size}, {self.num_workers} workers): resume on "
                             f"{was[0]} rank(s) with batch {was[1]} per rank and data.options.num_workers={was[2]}, "
                             "or with --resplit-data to go on from the next epoch on this split, or start a new "
                             "run from this one's weights with train.init_from")
        if state.get("shuffle_buffer", self.shuffle_buffer) != self.shuffle_buffer:  # (older checkpoints lack it)
            raise ValueError(f"cannot resume a shard stream with another shuffle buffer (was "
                             f"{state['shuffle_buffer']}, now {self.shuffle_buffer}): set shuffle_buffer: "
                             f"{state['shuffle_buffer']} in the data options to continue this run, or resume with "
                             "--resplit-data to go on from the next epoch with this one")
        self._restore_reading(state)
        self._go_to(int(state["epoch"]), int(state["consumed"]), [state])

    def resplit_from(self, states: list[dict[str, Any]]) -> None:
        """Go on from the positions ``states`` (every rank's, as checkpointed) under this stream's split or shuffle
        buffer, which differ from theirs (``selfflow train --resplit-data``): at the start of the epoch after the
        furthest rank's, the shards divided anew. What the ranks had not read of their last epoch is left out, so
        the samples are not those the uninterrupted run would have read. The skip counts carry over, so
        ``train.max_bad_data_fraction`` still sees them: each rank keeps its own on as many ranks, and rank 0 takes
        them all on another number."""
        self._restore_reading(states[0])
        if len(states) == self.world_size:
            mine = [states[self.rank]]
        else:
            mine = states if self.rank == 0 else []
        self._go_to(max(int(s["epoch"]) + (int(s["consumed"]) > 0) for s in states), 0, mine)
        if self.rank == 0:
            was = states[0]
            log.warning("resuming a shard stream read otherwise (was %d×%d, %d workers, shuffle buffer %s; now %d×%d, "
                        "%d workers, shuffle buffer %d): --resplit-data: it goes on from the start of epoch %d on this "
                        "split; the samples differ from the uninterrupted run's", *self.split_of(was),
                        was.get("shuffle_buffer", "?"), *self.split(), self.shuffle_buffer, self.epoch)

    def _go_to(self, epoch: int, consumed: int, counted: list[dict[str, Any]]) -> None:
        """Stand at ``consumed`` samples into ``epoch``, with the skip counts of the ``counted`` states summed."""
        self.epoch, self.consumed = epoch, consumed
        self.skipped = sum(int(s["skipped"]) for s in counted)
        self.lost_shards = sum(int(s.get("lost_shards", 0)) for s in counted)  # (older checkpoints lack it)
        self._at_position = (self.skipped, self.lost_shards)

    def _restore_reading(self, state: dict[str, Any]) -> None:
        """What a resume keeps of how the stream was reading, whatever the split: the same data (checked), the
        reference sample shape, the shard order."""
        # The position only means something in the same shards; where they lie may change (the data moved).
        if "shard_sizes" in state and (change := changed_shards(state["shard_sizes"], self.sizes)):
            raise ValueError(f"cannot resume a shard stream on other data than it was reading ({change}): point "
                             "the data options at that data, or start a new run from this one's weights with "
                             "train.init_from")
        # the reference shape of the samples, which the uninterrupted run took from its first good sample
        if state.get("shape") is not None:
            self.shape = tuple(state["shape"])
        if state.get("shard_order", FULL_PATH) == FULL_PATH:  # resumed in the order it was read in
            self._order = FULL_PATH
            log.warning("resuming a shard stream checkpointed before the shard order stopped depending on where the "
                        "data lies: the run keeps its full-path order (exact only with the data where it was)")
