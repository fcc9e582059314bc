"""The model folders a run reads (a VAE, a text or REPA encoder): which files they hold, whatever the path.

:func:`files_fingerprint` is a short digest of a folder's files, used where a run must know that a folder it
reads holds what it held before: a text encoder's weights against the captions prepared with it, and — through
:class:`ModelFolders` — a run resumed with a model folder moved (accepted when the files are the same) or with
the weights at the same path replaced (refused).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from .config import flat_section, location_entries, short_repr

log = logging.getLogger("selfflow")

WHOLE_BYTES = 16 << 20  # files up to this size are hashed whole; larger ones by their ends
END_BYTES = 1 << 20


def files_fingerprint(model_dir: Path) -> str:
    """A short digest of every file of a model directory (weights, tokenizer, configs; not ``*.md`` or hidden
    files), cheap even for tens of GB: each file's path, size and bytes — whole up to 16 MiB, else its first and
    last MiB, which differ between any two trainings of the same architecture."""
    digest = hashlib.sha256()
    files = sorted(p for p in model_dir.rglob("*") if p.is_file() and p.suffix != ".md"
                   and not any(part.startswith(".") for part in p.relative_to(model_dir).parts))
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.relative_to(model_dir).as_posix()}\0{size}\0".encode())
        with open(path, "rb") as f:
            if size <= WHOLE_BYTES:
                digest.update(f.read())
            else:
                digest.update(f.read(END_BYTES))
                f.seek(size - END_BYTES)
                digest.update(f.read())
    return digest.hexdigest()[:16]


class ModelFolders:
    """The model folders of a run's dumped ``config`` — the options each modality declares with
    ``model_location`` (``locations``: modality → dotted option names) that name an existing folder — and their
    :func:`files_fingerprint`, which every checkpoint keeps (:meth:`record`) and a resume compares."""

    def __init__(self, config: dict[str, Any], locations: dict[str, list[str]]):
        self.config = config
        self.entries = location_entries(config, locations)  # (key, modality, option)
        values = flat_section(config, "data")
        self.files: dict[str, str] = {}
        for key, _, _ in self.entries:
            folder = values.get(key)
            if not (isinstance(folder, str) and folder and Path(folder).is_dir()):
                continue  # unset, not a folder ("toy"), or missing (its loader says so)
            try:
                self.files[key] = files_fingerprint(Path(folder))
            except OSError as e:  # an unreadable file: the folder goes unchecked, its loader decides
                log.warning("selfflow: warning: cannot fingerprint %s=%s (%s): a resume or load will not check "
                            "which files it holds", key, folder, e)

    def record(self) -> str | None:
        """What a checkpoint keeps (``None``: the run reads no model folder)."""
        return json.dumps(self.files, sort_keys=True) if self.files else None

    @staticmethod
    def read_record(state: dict[str, Any]) -> dict[str, str]:
        """A checkpoint's record (empty for one written before records were kept, or by a run without folders)."""
        return json.loads(state["model_files"]) if isinstance(state.get("model_files"), str) else {}

    def moved(self, stored: dict[str, Any], record: dict[str, str]) -> list[tuple[str, str, str]]:
        """The entries whose folder changed since the checkpoint (``stored``: its config) and holds the same files."""
        then, now = flat_section(stored, "data"), flat_section(self.config, "data")
        return [(key, modality, option) for key, modality, option in self.entries
                if then.get(key) != now.get(key) and key in record and record[key] == self.files.get(key)]

    def replaced(self, stored: dict[str, Any], record: dict[str, str]) -> list[str]:
        """``key ('path') holds other files … (fingerprint A then, B now)`` for a folder at the same path whose
        files changed since the checkpoint (weights replaced in place)."""
        then, now = flat_section(stored, "data"), flat_section(self.config, "data")
        return [f"{key} ({short_repr(now[key], 60)}) holds other files than when the checkpoint was written "
                f"(fingerprint {record[key]} then, {files} now)" for key, files in sorted(self.files.items())
                if then.get(key) == now.get(key) and record.get(key, files) != files]

    def note(self, key: str, record: dict[str, str]) -> str:
        """Why a changed model folder ``key`` (a ``resume_conflicts`` line's key) is not the same folder moved;
        ``""`` for any other key."""
        if key not in self.files:
            return ""
        if key not in record:
            return (" — the checkpoint kept no fingerprint of the folder it read (it was not a folder then, or the "
                    "checkpoint is older than fingerprints), so a move cannot be told from other weights")
        return f" — other files: fingerprint {record[key]} then, {self.files[key]} now"
