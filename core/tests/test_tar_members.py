"""The fast tar reader equals tarfile on every layout it reads and hands the others back to tarfile."""

import gzip
import io
import tarfile

import numpy as np
import pytest

from selfflow.core.data.shard_stream import _tar_members
from selfflow.core.data.shard_writer import write_shards
from selfflow.core.data.tar_members import Unsupported, iter_members


def _tarfile_members(path):
    with tarfile.open(path, "r|*") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


def _write_tar(path, members, fmt):
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


MEMBERS = [("a/0001.latent.npy", b"x" * 700), ("a/0001.txt", b"caption"), ("a/0002.txt", b""),
           ("d" * 40 + "/" + "n" * 120 + ".cls", b"3")]  # a name over 100 bytes: ustar prefix or long name


def test_equals_tarfile_on_a_shard_of_our_writer(tmp_path):
    rng = np.random.default_rng(0)
    write_shards(list(range(5)), lambda i: {"latent": rng.standard_normal((4, 3)).astype(np.float16),
                                            "caption": f"s {i}", "label": i}, tmp_path, shard_size=5)
    (shard,) = tmp_path.glob("*.tar")
    assert list(iter_members(shard)) == _tarfile_members(shard)


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT])
def test_equals_tarfile_on_ustar_and_gnu_long_names(tmp_path, fmt):
    members = MEMBERS if fmt == tarfile.GNU_FORMAT else [*MEMBERS[:3], ("d" * 40 + "/" + "n" * 90, b"3")]
    _write_tar(tmp_path / "s.tar", members, fmt)
    assert list(iter_members(tmp_path / "s.tar")) == members == _tarfile_members(tmp_path / "s.tar")


def test_pax_and_gzip_tars_are_handed_to_tarfile(tmp_path):
    _write_tar(tmp_path / "pax.tar", MEMBERS, tarfile.PAX_FORMAT)
    (tmp_path / "s.tar.gz").write_bytes(gzip.compress((tmp_path / "pax.tar").read_bytes()))
    for path in (tmp_path / "pax.tar", tmp_path / "s.tar.gz"):
        with pytest.raises(Unsupported):
            next(iter_members(path))
        assert list(_tar_members(str(path))) == MEMBERS


def test_damage_yields_the_members_before_it_then_raises(tmp_path):
    _write_tar(tmp_path / "s.tar", MEMBERS[:3], tarfile.USTAR_FORMAT)
    data = bytearray((tmp_path / "s.tar").read_bytes())
    second_header = 512 + 1024  # header + 700 bytes padded to two blocks
    bad = bytearray(data)
    bad[second_header + 10] ^= 0xFF  # a name byte: the header checksum no longer matches
    (tmp_path / "bad.tar").write_bytes(bytes(bad))
    got = []
    with pytest.raises(tarfile.ReadError, match="checksum"):
        for member in iter_members(tmp_path / "bad.tar"):
            got.append(member)
    assert got == MEMBERS[:1]
    (tmp_path / "cut.tar").write_bytes(bytes(data[:512 + 300]))  # inside the first member
    with pytest.raises(EOFError):
        list(iter_members(tmp_path / "cut.tar"))
    (tmp_path / "boundary.tar").write_bytes(bytes(data[:second_header]))  # at a member boundary: clean end
    assert list(iter_members(tmp_path / "boundary.tar")) == MEMBERS[:1]
    (tmp_path / "empty.tar").write_bytes(b"")
    with pytest.raises(tarfile.ReadError, match="empty"):
        list(iter_members(tmp_path / "empty.tar"))
