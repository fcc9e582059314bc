"""Prompts for text-conditioned sampling: reading a prompt file, and the ``prompts.jsonl`` record that pairs
each generated sample with its prompt (what ``selfflow eval t2i|fvd|fad`` read back)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from .atomic import atomic_write_text
from .config import ConfigError

PROMPTS_FILE = "prompts.jsonl"
PROMPT_KEYS = ("prompt", "caption")


def read_prompt_file(path: str | Path) -> list[str]:
    """The prompts of a ``.txt`` (one per non-empty line) or ``.jsonl`` (a ``"prompt"`` or ``"caption"``
    field per line) file, in file order."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"prompt file {path} is a directory: give a .txt or .jsonl file")
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ConfigError(f"prompt file {path} is not UTF-8 text (byte {e.start}: {e.reason}): give a .txt or "
                          ".jsonl file of prompts") from None
    if path.suffix != ".jsonl":
        prompts = [line.strip() for line in lines if line.strip()]
    else:
        prompts = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{n}: not a JSON object ({e.msg})") from None
            text = next((record[k] for k in PROMPT_KEYS if isinstance(record, dict) and k in record), None)
            if not isinstance(text, str):
                raise ConfigError(f"{path}:{n}: needs a string field \"prompt\" or \"caption\"")
            prompts.append(text)
    if not prompts:
        raise ConfigError(f"{path} holds no prompts")
    return prompts


def gather_prompts(prompts: list[str] | None, prompt_file: str | Path | None) -> list[str] | None:
    """``--prompt`` texts followed by the ``--prompts`` file's; ``None`` when neither is given."""
    found = list(prompts or []) + (read_prompt_file(prompt_file) if prompt_file is not None else [])
    return found or None


def write_grid_prompts(grid: Path, prompts: Sequence[str], n: int) -> Path:
    """``<grid>.prompts.txt`` beside a grid of ``n`` samples drawn from ``prompts``: sample i's prompt
    (``prompts[i mod P]``) on line i, a file ``--prompts`` reads back."""
    lines = [prompts[i % len(prompts)] for i in range(n)]
    return atomic_write_text(grid.with_name(grid.stem + ".prompts.txt"), "\n".join(lines) + "\n")


def write_prompt_records(out_dir: Path, files: list[str], prompts: list[str]) -> Path:
    """``out_dir/prompts.jsonl``: ``{"index", "file", "prompt"}`` per sample, in sample order."""
    lines = [json.dumps({"index": i, "file": f, "prompt": p}, ensure_ascii=False)
             for i, (f, p) in enumerate(zip(files, prompts, strict=True))]
    return atomic_write_text(out_dir / PROMPTS_FILE, "\n".join(lines) + "\n")


def read_prompt_records(path: str | Path) -> list[dict]:
    """The records of a ``prompts.jsonl`` written by :func:`write_prompt_records`."""
    path = Path(path)
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            record = json.loads(line)
            if not {"file", "prompt"} <= set(record):
                raise ConfigError(f"{path}:{n}: needs the fields \"file\" and \"prompt\"")
            records.append(record)
    return records
