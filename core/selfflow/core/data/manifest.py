"""Lists of captioned media files for ``selfflow prepare``.

Input is either a directory (every file with one of the given extensions, recursively, sorted; the
caption of ``clip.mp4`` is ``clip.txt`` beside it, if present) or a JSON-lines manifest with one object
per line: ``{"path": "...", "caption": "...", "label": 3}`` (relative paths are relative to the manifest;
``file`` or ``file_name`` — the Hugging Face ``imagefolder`` ``metadata.jsonl`` column — may stand for
``path``).

A caption file beside a medium is read when the item is processed (:attr:`MediaItem.caption`), inside
the shard writer's per-item ``try``: a caption that is not UTF-8 skips, counts and lists its item like a
corrupt medium instead of stopping the whole ``prepare``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class MediaItem:
    """One medium: its caption is ``text`` (from a manifest) or the content of ``caption_file``."""

    path: Path
    text: str | None = None
    label: int | None = None
    caption_file: Path | None = None

    @property
    def caption(self) -> str | None:
        """The caption; raises ValueError naming the caption file when it is not UTF-8 text."""
        if self.caption_file is None:
            return self.text
        try:
            return self.caption_file.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError as e:
            raise ValueError(f"caption {self.caption_file} is not UTF-8 text ({e})") from None

    def __str__(self) -> str:
        return str(self.path)


_PATH_KEYS = ("path", "file", "file_name")


def list_media(source: str | Path, extensions: tuple[str, ...]) -> list[MediaItem]:
    """The media a ``prepare`` target reads: the files with ``extensions`` under a folder (captions from
    ``NAME.txt`` beside them), or the rows of a ``.jsonl`` manifest. Nothing to prepare is an error, before
    anything is written: an empty run would leave an order record that refuses the real one."""
    items = _list_media(Path(source), extensions)
    if not items:
        raise ValueError(f"prepare input {source} holds no media to prepare (a folder with "
                         f"{'/'.join(e.lstrip('.') for e in extensions)} files, or a .jsonl manifest with rows)")
    return items


def _list_media(src: Path, extensions: tuple[str, ...]) -> list[MediaItem]:
    if src.is_dir():
        files = sorted(p for p in src.rglob("*") if p.suffix.lower() in extensions)
        return [MediaItem(p, caption_file=p.with_suffix(".txt") if p.with_suffix(".txt").is_file() else None)
                for p in files]
    if src.is_file() and src.suffix == ".jsonl":
        try:
            lines = src.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise ValueError(f"manifest {src} is not UTF-8 text ({e})") from None
        items = []
        for n, line in enumerate(lines, 1):
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


PREVIEW_CAPTIONS = 8  # captions a preparation keeps in codec.json for the sample previews


def preview_captions(items: list[MediaItem], n: int = PREVIEW_CAPTIONS) -> list[str]:
    """The first ``n`` non-empty readable captions (for sample previews); unreadable ones are left to the
    shard writer to skip and report."""
    out: list[str] = []
    for item in items:
        if len(out) == n:
            break
        try:
            caption = item.caption
        except ValueError:
            continue
        if caption:
            out.append(caption)
    return out
