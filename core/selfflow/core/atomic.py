"""Atomic file replacement: a file the trainer rewrites is either its old or its new content, never a mix.

The new content goes to a temporary file beside the target, is flushed and fsynced, then renamed over the
target (``os.replace`` is atomic on POSIX and Windows); the directory is fsynced so the rename itself
survives a power loss. A process killed at any point leaves the old file intact (and at worst a stale
``.<name>.<random>.tmp`` beside it, which nothing reads).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms (Windows) cannot open a directory
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without an error, its content is fsynced
    and renamed onto ``path``. On an error the temporary file is removed and ``path`` is left as it was.
    For writers that want a path (``savefig``, ``save_file``, ``torch.save``)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    # os.open with 0o666 (not mkstemp's 0o600) so the file gets the usual umask permissions
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    mode = tmp.stat().st_mode & 0o777
    try:
        yield tmp
        os.chmod(tmp, mode)  # writers that recreate the file (safetensors' save_file: 0o600) keep the umask's mode
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):  # best effort: on a read-only disk the original error matters
            tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Replace ``path`` with ``data`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Replace ``path`` with ``text`` atomically."""
    return atomic_write_bytes(path, text.encode(encoding))
