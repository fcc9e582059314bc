"""What a modality reads from its data directory to build itself — a shard directory's ``codec.json``, its
latent statistics, a robot dataset's action statistics — recorded with a run (``data_facts.json``) and in its
pretrained export, so that the model loads and samples without the data (on another machine, after the shards
moved) and with the numbers it was trained with (after the data was prepared again). Beside them the record
keeps the fingerprints of the model folders the run read (``model_files``: a VAE, a text encoder;
:mod:`selfflow.core.model_folders`), so a loaded model tells when it is given other weights than it trained with.

Readers go through :func:`data_fact`; :func:`collecting` gathers what they read (``build_run`` does, for every
run), :func:`replaying` answers them from a record (loading a run or a pretrained directory).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any

FACTS_FILE = "data_facts.json"
MODEL_FILES = "model_files"  # {config key: fingerprint} of the run's model folders (no reader asks for it)

_collected: ContextVar[dict[str, Any] | None] = ContextVar("selfflow_collected_data_facts", default=None)
_recorded: ContextVar[dict[str, Any] | None] = ContextVar("selfflow_recorded_data_facts", default=None)


def data_fact(key: str, read: Callable[[], Any]) -> Any:
    """``read()`` — or, while :func:`replaying` a record that holds ``key``, the recorded value (``read`` is
    then not called, so absent data is no error). Values must be JSON (dicts, lists, numbers, strings, None)."""
    recorded = _recorded.get()
    value = recorded[key] if recorded is not None and key in recorded else read()
    collected = _collected.get()
    if collected is not None:
        collected[key] = value
    return value


def is_recorded(key: str) -> bool:
    """Whether :func:`replaying` answers ``key`` (a reader that would otherwise create the data checks it)."""
    recorded = _recorded.get()
    return recorded is not None and key in recorded


@contextlib.contextmanager
def collecting() -> Iterator[dict[str, Any]]:
    """Within the block, every :func:`data_fact` lands in the yielded dict."""
    facts: dict[str, Any] = {}
    token = _collected.set(facts)
    try:
        yield facts
    finally:
        _collected.reset(token)


@contextlib.contextmanager
def replaying(facts: dict[str, Any] | None) -> Iterator[None]:
    """Within the block, :func:`data_fact` answers the keys of ``facts`` from it (None: from the data)."""
    token = _recorded.set(facts)
    try:
        yield
    finally:
        _recorded.reset(token)


def read_facts(run_dir: str | Path) -> dict[str, Any] | None:
    """A run directory's recorded facts (None for runs from before the record existed)."""
    path = Path(run_dir) / FACTS_FILE
    return json.loads(path.read_text()) if path.is_file() else None
