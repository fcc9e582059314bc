"""TensorFlow-free reader (and fake writer) of RT-1 RLDS TFRecords (``fractal20220817_data``).

One TFRecord record is one episode serialised as a ``tf.train.Example`` whose per-step fields are
flattened and concatenated over the episode's T steps under ``steps/<field>`` keys (e.g.
``steps/action/world_vector`` holds 3·T floats). Framing and protobuf parsing come from the ``tfrecord``
PyPI package; the JPEG bytes are taken straight from the proto (``tfrecord_loader`` strips trailing NUL
bytes of multi-valued bytes features, which could corrupt a JPEG). The framing is read here, not by
``tfrecord.reader`` (which checks no CRC and allocates whatever length a damaged header claims): a record
whose data CRC fails is rejected alone; a damaged frame header or a truncated file ends that file, keeping
the episodes before it.

The 7-D raw action is ``world_vector (3) ++ rotation_delta (3) ++ gripper_closedness_action (1)`` in
fractal's own units (relative gripper: +1 close, −1 open, 0 no change). The base-displacement dims are
identically zero in fractal: an episode where they are not is rejected (:class:`EpisodeError`).
"""

from __future__ import annotations

import hashlib
import io
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path

import numpy as np
from google.protobuf.message import DecodeError
from tfrecord import example_pb2
from tfrecord.writer import TFRecordWriter

IMAGE = "steps/observation/image"
INSTRUCTION = "steps/observation/natural_language_instruction"
WORLD_VECTOR = "steps/action/world_vector"
ROTATION_DELTA = "steps/action/rotation_delta"
GRIPPER = "steps/action/gripper_closedness_action"
TERMINATE = "steps/action/terminate_episode"
BASE_DISPLACEMENT = "steps/action/base_displacement_vector"
BASE_ROTATION = "steps/action/base_displacement_vertical_rotation"
BASE_POSE_TOOL = "steps/observation/base_pose_tool_reached"
GRIPPER_CLOSED = "steps/observation/gripper_closed"
IS_FIRST, IS_LAST, IS_TERMINAL, REWARD = "steps/is_first", "steps/is_last", "steps/is_terminal", "steps/reward"


class EpisodeError(ValueError):
    """A record that is not a usable fractal episode (missing key, wrong length, non-zero base motion)."""


class TFRecordFrameError(ValueError):
    """A TFRecord file whose framing is damaged at record ``index`` (truncated, bad length or length CRC):
    nothing after it can be read."""

    def __init__(self, message: str, index: int):
        super().__init__(message)
        self.index = index


@dataclass
class Episode:
    """One episode: ``frames`` T JPEG blobs (256×320 in fractal), ``actions (T, 7)`` float32 raw units,
    ``proprio (T, 8)`` (tool pose xyz + quaternion xyzw, gripper_closed) and provenance in ``meta``."""

    frames: list[bytes]
    actions: np.ndarray
    instruction: str
    proprio: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    @property
    def length(self) -> int:
        return len(self.frames)


def _floats(f, key: str, steps: int, width: int, where: str) -> np.ndarray:
    if key not in f:
        raise EpisodeError(f"{where}: missing feature {key!r}")
    values = np.asarray(f[key].float_list.value or f[key].int64_list.value, dtype=np.float32)
    if values.size != steps * width:
        raise EpisodeError(f"{where}: {key!r} has {values.size} values, expected {steps}×{width}")
    return values.reshape(steps, width)


def parse_episode(record: bytes, where: str = "record") -> Episode:
    """One serialised ``tf.train.Example`` → :class:`Episode` (raises :class:`EpisodeError`)."""
    try:
        f = example_pb2.Example.FromString(bytes(record)).features.feature
    except DecodeError as e:
        raise EpisodeError(f"{where}: not a tf.train.Example ({e})") from None
    if IS_FIRST not in f:
        raise EpisodeError(f"{where}: missing feature {IS_FIRST!r}: is this an RLDS fractal shard?")
    steps = len(f[IS_FIRST].int64_list.value)
    frames = list(f[IMAGE].bytes_list.value) if IMAGE in f else []
    if len(frames) != steps or steps == 0:
        raise EpisodeError(f"{where}: {len(frames)} images for {steps} steps")
    for key, width in ((BASE_DISPLACEMENT, 2), (BASE_ROTATION, 1)):
        if key in f and np.any(_floats(f, key, steps, width, where) != 0):
            raise EpisodeError(f"{where}: non-zero {key!r} (fractal's base never moves)")
    actions = np.concatenate([_floats(f, WORLD_VECTOR, steps, 3, where), _floats(f, ROTATION_DELTA, steps, 3, where),
                              _floats(f, GRIPPER, steps, 1, where)], axis=1)
    proprio = None
    if BASE_POSE_TOOL in f and GRIPPER_CLOSED in f:
        proprio = np.concatenate([_floats(f, BASE_POSE_TOOL, steps, 7, where),
                                  _floats(f, GRIPPER_CLOSED, steps, 1, where)], axis=1)
    texts = f[INSTRUCTION].bytes_list.value if INSTRUCTION in f else []
    if not texts:
        raise EpisodeError(f"{where}: missing feature {INSTRUCTION!r}")
    is_last = list(f[IS_LAST].int64_list.value) if IS_LAST in f else []
    try:
        instruction = texts[0].decode("utf-8")
    except UnicodeDecodeError as e:
        raise EpisodeError(f"{where}: {INSTRUCTION!r} is not UTF-8 ({e})") from None
    return Episode(frames=frames, actions=actions, instruction=instruction, proprio=proprio,
                   meta={"steps": steps, "is_last": bool(is_last and is_last[-1]),
                         "sha256": hashlib.sha256(bytes(record)).hexdigest()})


def tfrecord_frames(path: str | Path) -> Iterator[tuple[bytes, bytes]]:
    """``(record, stored masked CRC of the record)`` for each frame of one TFRecord file (the record's own
    CRC is left to the caller: a mismatch spoils that record only). Raises :class:`TFRecordFrameError` at a
    truncated frame or a length whose CRC fails."""
    name, size = Path(path).name, Path(path).stat().st_size
    with open(path, "rb") as f:
        for index in count():
            header = f.read(12)
            if not header:
                return
            if len(header) < 12 or TFRecordWriter.masked_crc(header[:8]) != header[8:]:
                raise TFRecordFrameError(f"{name}[{index}]: damaged record header at byte {f.tell() - len(header)} "
                                         "(truncated or corrupt file); the rest of the file is skipped", index)
            (length,) = struct.unpack("<Q", header[:8])
            if length + 4 > size - f.tell():
                raise TFRecordFrameError(f"{name}[{index}]: truncated record ({size - f.tell()} bytes left for a "
                                         f"{length}-byte record); the rest of the file is skipped", index)
            yield f.read(length), f.read(4)


def read_episodes(path: str | Path, errors: list[dict] | None = None) -> Iterator[Episode]:
    """Every valid episode of one TFRecord shard, with ``meta["source"]`` and ``meta["index"]``.

    A bad record — and a damaged frame, a truncated or unreadable file, which end the file — is skipped
    and appended to ``errors`` (``{"source", "index", "error"}``) when given, otherwise raised.
    """
    index = 0
    try:
        for index, (raw, crc) in enumerate(tfrecord_frames(path)):
            where = f"{Path(path).name}[{index}]"
            try:
                if TFRecordWriter.masked_crc(raw) != crc:
                    raise EpisodeError(f"{where}: record CRC mismatch (corrupt bytes)")
                ep = parse_episode(raw, where)
            except EpisodeError as e:
                if errors is None:
                    raise
                errors.append({"source": str(path), "index": index, "error": str(e)})
                continue
            ep.meta.update(source=Path(path).name, index=index)
            yield ep
    except (TFRecordFrameError, OSError) as e:
        if errors is None:
            raise
        at = e.index if isinstance(e, TFRecordFrameError) else index
        # the file ends here: its later episodes are lost unread, uncounted (a record's length comes with it)
        errors.append({"source": str(path), "index": at, "error": f"{type(e).__name__}: {e}", "rest_of_file": True})


# --- fake shards (tests, the embedded default of `make finetune-rt1`) -----------------------------------
FAKE_INSTRUCTIONS = ["move blue chip bag near apple", "open top drawer", "place apple into top drawer",
                     "pick coke can"]


def _jpeg(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def fake_episode_features(rng: np.random.Generator, steps: int, size: tuple[int, int], instruction: str,
                          base_motion: bool = False) -> dict[str, tuple[Sequence, str]]:
    """The flattened ``steps/*`` features of one synthetic episode with the real key names: a square
    drifts with the end-effector translation; gripper events (+1 close, −1 open) at random steps."""
    h, w = size
    wv = rng.uniform(-0.03, 0.03, (steps, 3)).astype(np.float32)
    rot = rng.uniform(-0.05, 0.05, (steps, 3)).astype(np.float32)
    grip = np.zeros(steps, np.float32)
    close_at = int(rng.integers(1, max(2, steps - 1)))
    grip[close_at] = 1.0
    if close_at + 2 < steps:
        grip[close_at + 2] = -1.0
    pos = np.array([h / 2, w / 2])
    frames = []
    for k in range(steps):
        img = np.full((h, w, 3), 40, np.uint8)
        y, x = (pos + wv[k, :2] * 200).astype(int).clip([2, 2], [h - 3, w - 3])
        img[y - 2:y + 3, x - 2:x + 3] = (230, 60, 60) if grip[: k + 1].sum() > 0 else (60, 230, 60)
        pos = pos + wv[k, :2] * 200
        frames.append(_jpeg(img))
    term = np.zeros((steps, 3), np.int64)
    term[:, 1] = 1
    term[-1] = (1, 0, 0)
    first = np.zeros(steps, np.int64)
    first[0] = 1
    last = np.zeros(steps, np.int64)
    last[-1] = 1
    base = np.zeros((steps, 2), np.float32)
    if base_motion:
        base[steps // 2] = 0.1
    return {
        IMAGE: (frames, "byte"), INSTRUCTION: ([instruction.encode()] * steps, "byte"),
        "steps/observation/natural_language_embedding": (np.zeros(steps * 512, np.float32).tolist(), "float"),
        BASE_POSE_TOOL: (rng.normal(size=steps * 7).astype(np.float32).tolist(), "float"),
        GRIPPER_CLOSED: ((np.cumsum(grip) > 0).astype(np.float32).tolist(), "float"),
        WORLD_VECTOR: (wv.ravel().tolist(), "float"), ROTATION_DELTA: (rot.ravel().tolist(), "float"),
        GRIPPER: (grip.tolist(), "float"), TERMINATE: (term.ravel().tolist(), "int"),
        BASE_DISPLACEMENT: (base.ravel().tolist(), "float"), BASE_ROTATION: ([0.0] * steps, "float"),
        IS_FIRST: (first.tolist(), "int"), IS_LAST: (last.tolist(), "int"), IS_TERMINAL: (last.tolist(), "int"),
        REWARD: (last.astype(np.float32).tolist(), "float"),
    }


def write_fake_shards(out_dir: str | Path, *, shards: int = 2, episodes_per_shard: int = 3,
                      steps: tuple[int, int] = (6, 10), size: tuple[int, int] = (32, 40), seed: int = 0,
                      bad_episodes: int = 0) -> list[Path]:
    """Write ``fractal20220817_data-train.tfrecord-XXXXX-of-NNNNN`` files of synthetic episodes; the last
    ``bad_episodes`` of the first shard move the base (the converter must reject them)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for s in range(shards):
        path = out / f"fractal20220817_data-train.tfrecord-{s:05d}-of-{shards:05d}"
        writer = TFRecordWriter(str(path))
        for e in range(episodes_per_shard):
            bad = s == 0 and e >= episodes_per_shard - bad_episodes
            n = int(rng.integers(steps[0], steps[1] + 1))
            instr = FAKE_INSTRUCTIONS[int(rng.integers(len(FAKE_INSTRUCTIONS)))]
            writer.write(fake_episode_features(rng, n, size, instr, base_motion=bad))
        writer.close()
        paths.append(path)
    return paths
