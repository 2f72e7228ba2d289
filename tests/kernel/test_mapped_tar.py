"""A plain tar in a regular file takes convert_layer's mmap path (`tarstream.MappedTar`): the
image, its digests and its dm-verity root must be the bytes the streaming path
(`LayerStream`, what a pipe or a socket takes) gives, and a bad tar the same one-line error.
The images of the streaming path are the ones the kernel and erofs-utils tests check."""

from __future__ import annotations

import io
import random
import tarfile
from pathlib import Path

import pytest

from snapshotter.errors import EpError
from snapshotter.ingest import convert as convert_mod
from snapshotter.ingest import tarstream
from snapshotter.ingest.convert import convert_layer
from tests.support.layers import Entry, awkward_entries, write_tar


class _Pipe:
    """A reader with no file descriptor: convert_layer streams it (LayerStream)."""

    def __init__(self, data: bytes) -> None:
        self._src = io.BytesIO(data)

    def read(self, size: int = -1) -> bytes:
        return self._src.read(size)


def _holes_entries() -> list[Entry]:
    rng = random.Random(11)
    chunk = 64 << 10
    data = rng.randbytes(chunk) + bytes(3 * chunk) + rng.randbytes(5000) + bytes(chunk)
    return [
        Entry("holes", data=data),
        Entry("zeros", data=bytes(4 * chunk + 17)),
        Entry("big", data=rng.randbytes(3 << 20)),
        Entry("small", data=b"x" * 5000),
        Entry("tiny", data=b"y"),
    ]


def _layers(tmp: Path) -> dict[str, bytes]:
    layers = {
        "awkward": write_tar(tmp / "a.tar", awkward_entries()).read_bytes(),
        "holes": write_tar(tmp / "h.tar", _holes_entries()).read_bytes(),
        "gnu": write_tar(tmp / "g.tar", _holes_entries(), tarfile.GNU_FORMAT).read_bytes(),
    }
    layers["trailing"] = layers["holes"] + b"after the end marker"  # hashed all the same
    return layers


def _convert(source, out: Path, verity: bool) -> tuple[bytes, tuple]:
    r = convert_layer(source, out, verity=True if verity else None, blob_digest=True)
    fields = (r.diff_id, r.compressed_digest, r.compression, r.entries, r.blob_digest)
    return out.read_bytes(), (*fields, r.verity.root_hash if r.verity else None)


def _uses_mapped(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    made: list[int] = []
    real = convert_mod._mapped_tar

    def spy(source, limits):
        mapped = real(source, limits)
        made.append(mapped is not None)
        return mapped

    monkeypatch.setattr(convert_mod, "_mapped_tar", spy)
    return made


@pytest.mark.parametrize("verity", [False, True])
@pytest.mark.parametrize("windows", ["default", "small"])
def test_mapped_path_gives_the_streamed_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, verity: bool, windows: str
) -> None:
    if windows == "small":  # every read and hash crosses mmap windows
        monkeypatch.setattr(tarstream, "WINDOW", 8192)
        monkeypatch.setattr(tarstream, "HASH_WINDOW", 12288)
    made = _uses_mapped(monkeypatch)
    for name, data in _layers(tmp_path).items():
        path = tmp_path / f"{name}.tar"
        path.write_bytes(data)
        want = _convert(_Pipe(data), tmp_path / "streamed.erofs", verity)
        got = _convert(path, tmp_path / "mapped.erofs", verity)
        assert got == want, name
        # From a file positioned past a prefix (the tar starts mid-page: headers straddle
        # the windows' ends when they are small).
        prefixed = tmp_path / f"{name}.prefixed"
        prefixed.write_bytes(b"p" * 700 + data)
        with open(prefixed, "rb") as f:
            f.seek(700)
            assert _convert(f, tmp_path / "mapped2.erofs", verity) == want, name
            assert f.tell() == 700 + len(data)  # read to the end, as LayerStream leaves it
    assert made == [False, True, True] * 4


def _error(source, out: Path) -> str:
    with pytest.raises(EpError) as info:
        convert_layer(source, out)
    assert not out.exists()
    assert "\n" not in str(info.value)
    return f"{type(info.value).__name__}: {info.value}"


def test_mapped_path_fails_as_the_streamed_one(tmp_path: Path) -> None:
    data = write_tar(tmp_path / "h.tar", _holes_entries()).read_bytes()
    header = bytearray(data[:512])
    header[130] = ord("9")  # a corrupt size field in the first header
    bad = {
        "truncated in data": data[: 512 + 100_000],
        "truncated in a header": data[:700],
        "corrupt header": bytes(header) + data[512:],
        "garbage": random.Random(3).randbytes(4096),
    }
    for name, content in bad.items():
        path = tmp_path / "bad.tar"
        path.write_bytes(content)
        assert _error(path, tmp_path / "o.erofs") == _error(_Pipe(content), tmp_path / "o.erofs"), (
            name
        )
    path.write_bytes(data)
    with pytest.raises(EpError, match="diffID mismatch"):
        convert_layer(path, tmp_path / "o.erofs", expected_diff_id="sha256:" + "0" * 64)
    assert not (tmp_path / "o.erofs").exists()


def test_what_is_not_a_plain_regular_file_streams(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.support.layers import compress

    made = _uses_mapped(monkeypatch)
    tar = write_tar(tmp_path / "h.tar", _holes_entries())
    for how in ("gzip", "zstd"):
        r = convert_layer(compress(tar, how), tmp_path / f"{how}.erofs")
        assert r.compression == how
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    want = _convert(_Pipe(b""), tmp_path / "e1.erofs", False)
    assert _convert(empty, tmp_path / "e2.erofs", False) == want  # an empty layer, streamed
    assert made == [False, False, False, False]
