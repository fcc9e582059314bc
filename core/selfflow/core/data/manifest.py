"""Lists of captioned media files for ``selfflow prepare``.

Input is either a directory (every file with one of the given extensions, recursively, sorted; the
caption of ``clip.mp4`` is ``clip.txt`` beside it, if present) or a JSON-lines manifest with one object
per line: ``{"path": "...", "caption": "...", "label": 3}`` (relative paths are relative to the manifest;
``file`` or ``file_name`` — the Hugging Face ``imagefolder`` ``metadata.jsonl`` column — may stand for
``path``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class MediaItem:
    path: Path
    caption: str | None = None
    label: int | None = None

    def __str__(self) -> str:
        return str(self.path)


_PATH_KEYS = ("path", "file", "file_name")


def list_media(source: str | Path, extensions: tuple[str, ...]) -> list[MediaItem]:
    src = Path(source)
    if src.is_dir():
        files = sorted(p for p in src.rglob("*") if p.suffix.lower() in extensions)
        return [MediaItem(p, p.with_suffix(".txt").read_text().strip() if p.with_suffix(".txt").is_file()
                          else None) for p in files]
    if src.is_file() and src.suffix == ".jsonl":
        items = []
        for n, line in enumerate(src.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                path = Path(next(row[k] for k in _PATH_KEYS if k in row))
            except (json.JSONDecodeError, StopIteration, TypeError) as e:
                raise ValueError(f"{src}:{n}: expected {{\"path\": …, \"caption\": …}} ({e})") from None
            items.append(MediaItem(path if path.is_absolute() else src.parent / path, row.get("caption"),
                                   row.get("label")))
        return items
    raise FileNotFoundError(f"prepare input {src} is neither a directory nor a .jsonl manifest")
