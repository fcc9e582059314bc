"""The members of an uncompressed tar shard, read from a memory map.

:mod:`tarfile` parses every header through a dozen Python calls (``nts``/``nti`` per field, a 512-byte
checksum loop, a ``TarInfo`` object); for shards of many small members that parsing cost more than the
decoding (the shard reader ran at 0.6× the speed of loose ``.npy`` files). This reader checks each header's
checksum, takes name, size and type from their fixed offsets and slices the member's bytes out of the map.
It reads the layouts our writers produce (POSIX ustar and GNU tar, incl. GNU long names); anything else — a
compressed tar, PAX extended headers, sparse files — raises :class:`Unsupported`, and the caller reads that
shard with :mod:`tarfile`, which knows every variant.

Errors follow :mod:`tarfile`'s stream mode, so the shard reader's skip policy sees the same events: a bad
header is :class:`tarfile.ReadError`, a member cut short is :class:`EOFError`, and a tar that ends at a member
boundary (no end-of-archive blocks) ends cleanly.
"""

from __future__ import annotations

import mmap
import tarfile
from collections.abc import Iterator
from pathlib import Path

BLOCK = 512
_REGULAR = (b"0", b"\0", b"7")  # regular file, old-style regular file, contiguous file
_SKIPPED = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, directories, FIFOs: no data to read


class Unsupported(Exception):
    """A tar layout this reader does not parse (the caller falls back to :mod:`tarfile`)."""


def _number(field: bytes) -> int:
    """A numeric header field: NUL/space-terminated octal, or GNU base-256 when the high bit is set."""
    if field[0] & 0x80:
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * len(field) - 8)) if field[0] & 0x40 else value
    digits = field.split(b"\0", 1)[0].strip()
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        raise tarfile.ReadError(f"invalid number {digits!r} in a tar header") from None


def _checksum_ok(header: bytes) -> bool:
    stored = _number(header[148:156])
    # The checksum counts its own 8 bytes as spaces (0x20 each = 256). Some writers used signed bytes.
    unsigned = sum(header) - sum(header[148:156]) + 256
    if stored == unsigned:
        return True
    signed = unsigned - 256 * sum(1 for b in header if b > 127)
    return stored == signed


def _member_index(data: mmap.mmap | bytes) -> tuple[list[tuple[str, int, int]], Exception | None]:
    """``(name, start, end)`` of every regular member, in archive order, up to the first damage; and the
    damage (a :class:`tarfile.ReadError` or :class:`EOFError`, None for an intact tar)."""
    out: list[tuple[str, int, int]] = []
    pos, end, long_name = 0, len(data), None
    while pos < end:
        if pos + BLOCK > end:
            return out, EOFError(f"tar cut inside a header at byte {pos}")
        header = data[pos:pos + BLOCK]
        if not any(header):  # end-of-archive block
            break
        try:
            if not _checksum_ok(header):
                raise tarfile.ReadError(f"bad tar header checksum at byte {pos}")
            size = _number(header[124:136])
        except tarfile.ReadError as e:
            return out, e
        kind = header[156:157]
        start = pos + BLOCK
        stop = start + size
        if stop > end:
            return out, EOFError(f"tar member at byte {pos} needs {size} bytes, {end - start} left")
        if kind == b"L":  # GNU long name: the next header's name
            long_name = data[start:stop].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        elif kind in _REGULAR or kind in _SKIPPED:
            if long_name is not None:
                name, long_name = long_name, None
            else:
                name = header[:100].split(b"\0", 1)[0]
                if header[257:262] == b"ustar" and header[345] != 0:
                    name = header[345:500].split(b"\0", 1)[0] + b"/" + name
                name = name.decode("utf-8", "surrogateescape")
            if kind in _REGULAR:
                out.append((name, start, stop))
        else:
            raise Unsupported(f"tar member type {kind!r} at byte {pos}")
        pos = start + -(-size // BLOCK) * BLOCK
    return out, None


def iter_members(path: str | Path) -> Iterator[tuple[str, bytes]]:
    """``(name, bytes)`` of every regular file of the uncompressed tar at ``path``, in archive order.

    The whole header index is read before the first member is yielded, so :class:`Unsupported` is raised
    before any data has been handed out (the caller can start over with :mod:`tarfile`); the errors of a
    corrupt or truncated tar come from the index too, after the members before them have been yielded.
    """
    with open(path, "rb") as f:
        if f.read(2) == b"\x1f\x8b":
            raise Unsupported("gzip-compressed tar")
        f.seek(0, 2)
        if f.tell() == 0:
            raise tarfile.ReadError("empty file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            index, error = _member_index(data)
            for name, start, stop in index:  # what precedes any damage, then the damage
                yield name, data[start:stop]
            if error is not None:
                raise error
