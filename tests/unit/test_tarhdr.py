"""Tar header parsing: the compiled parser (_tarhdr.c) and the pure-Python one give the same
header or the same one-line error for every block: the headers of real archives (Go's
archive/tar test corpus, GNU tar, Python's tarfile in every format), and damaged and
generated header blocks; and the same PAX records or error for every PAX header of those
archives and for generated and damaged ones."""

from __future__ import annotations

import dataclasses
import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snapshotter.errors import EpError
from snapshotter.ingest import tarstream
from snapshotter.ingest.streams import LayerStream
from snapshotter.ingest.tarstream import TarHeader, parse_pax_pure
from tests.support.layers import awkward_entries, write_tar

GO_TESTDATA = Path("/usr/lib/go/src/archive/tar/testdata")


def _module():
    """The compiled module; a missing build is a failure here (.ci/setup builds it)."""
    try:
        from snapshotter.ingest import _tarhdr
    except ImportError as exc:
        pytest.fail(f"the tar header accelerator is not built ({exc}): run .ci/setup")
    return _tarhdr


def _parse():
    return _module().parse


def _outcome(unpack, block: bytes) -> tuple:
    try:
        return ("ok", dataclasses.astuple(unpack(block)))
    except EpError as exc:
        return ("error", type(exc).__name__, str(exc))


def _compiled(block: bytes) -> TarHeader:
    fields = _parse()(block)
    if fields is None:  # not a block the compiled parser takes: the Python parser judges it
        return TarHeader.unpack_pure(block)
    return TarHeader(*fields, block)


def _check(block: bytes) -> tuple:
    pure = _outcome(TarHeader.unpack_pure, block)
    assert _outcome(_compiled, block) == pure
    return pure


def _blocks(data: bytes):
    for pos in range(0, len(data) - 511, 512):
        block = data[pos : pos + 512]
        if block != bytes(512):
            yield block


def _tarfile_archive(fmt: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, size, kind in [
            ("a" * 99, 3, tarfile.REGTYPE),
            ("dir/" * 30 + "f", 0, tarfile.REGTYPE),
            ("d", 0, tarfile.DIRTYPE),
            ("dev", 0, tarfile.CHRTYPE),
            ("big", 8 << 30, tarfile.REGTYPE),
        ]:
            info = tarfile.TarInfo(name)
            info.type, info.size = kind, size if kind == tarfile.REGTYPE else 0
            info.uid, info.gid, info.mtime = 3_000_000, 70000, 1_700_000_000
            info.devmajor, info.devminor = 259, 70000
            info.linkname = "l" * 120 if fmt != tarfile.USTAR_FORMAT else ""
            if fmt == tarfile.USTAR_FORMAT:
                info.uid, info.gid, info.size = 1000, 1000, min(info.size, 3)
                info.devminor = 7
            tar.addfile(info, io.BytesIO(bytes(info.size)) if info.size < 1 << 20 else None)
            if info.size >= 1 << 20:
                break  # a header only: its data is not needed
    return buf.getvalue()


def _pax_outcome(parse, data: bytes) -> tuple:
    try:
        return ("ok", list(parse(data).items()))  # the order too
    except EpError as exc:
        return ("error", type(exc).__name__, str(exc))


def _pax_compiled(data: bytes) -> dict[bytes, bytes]:
    records = _module().parse_pax(data)
    return parse_pax_pure(data) if records is None else records


def _check_pax(data: bytes) -> tuple:
    pure = _pax_outcome(parse_pax_pure, data)
    assert _pax_outcome(_pax_compiled, data) == pure
    return pure


def _pax_headers(archive: bytes) -> list[bytes]:
    """The data of every PAX header (x, g, X) in `archive`, walked by header sizes."""
    found = []
    pos = 0
    while pos + 512 <= len(archive):
        block = archive[pos : pos + 512]
        pos += 512
        if block == bytes(512):
            continue
        try:
            header = TarHeader.unpack_pure(block)
        except EpError:
            break
        size = 0 if header.typeflag in tarstream.HEADER_ONLY else header.size
        if header.typeflag in b"xgX":
            found.append(archive[pos : pos + size])
        pos += -(-max(size, 0) // 512) * 512
    return found


def test_pax_headers_of_real_archives_agree(tmp_path: Path):
    archives = [p.read_bytes() for p in sorted(GO_TESTDATA.glob("*.tar"))]
    archives.append(_tarfile_archive(tarfile.PAX_FORMAT))
    archives.append(write_tar(tmp_path / "l.tar", awkward_entries()).read_bytes())
    headers = [h for a in archives for h in _pax_headers(a)]
    outcomes = [_check_pax(h)[0] for h in headers]
    assert outcomes.count("ok") > 20 and len(headers) > 30


_PAX_KEYS = [b"path", b"linkpath", b"mtime", b"size", b"uid", b"SCHILY.xattr.user.a", b"k"]
_PAX_KEYS += [b"GNU.sparse.offset", b"GNU.sparse.numbytes", b"GNU.sparse.map", b"", b"a\0b"]


@st.composite
def _pax_data(draw) -> bytes:
    out = b""
    for _ in range(draw(st.integers(0, 6))):
        key = draw(st.sampled_from(_PAX_KEYS) | st.binary(max_size=8))
        value = draw(st.binary(max_size=12) | st.sampled_from([b"a\0", b"1", b"=", b""]))
        body = b" " + key + draw(st.sampled_from([b"=", b"", b"=="])) + value + b"\n"
        n = len(body) + 1
        n += len(str(n + len(str(n)) - 1)) - 1
        length = draw(st.sampled_from([n, n, n, n - 1, n + 1, 0, 4, 10**20, 99999]))
        digits = draw(st.sampled_from([b"%d" % length, b"0%d" % length, b"+%d" % length]))
        out += digits + body
    out += draw(st.sampled_from([b"", b"\0" * 5, b"x", b"7 "]))
    return out


@settings(max_examples=3000, deadline=None)
@given(_pax_data())
def test_generated_pax_headers_agree(data: bytes):
    _check_pax(data)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=64))
def test_random_pax_bytes_agree(data: bytes):
    _check_pax(data)


def test_go_corpus_headers_agree():
    if not GO_TESTDATA.is_dir():
        pytest.skip("Go's archive/tar test corpus is not installed (golang-go)")
    checked = accepted = 0
    for path in sorted(GO_TESTDATA.glob("*.tar")):
        for block in _blocks(path.read_bytes()):
            checked += 1
            accepted += _check(block)[0] == "ok"
    assert checked > 150 and accepted > 60  # the corpus was read, headers among it


def test_tarfile_and_layer_headers_agree(tmp_path: Path):
    archives = [_tarfile_archive(f) for f in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT)]
    archives.append(_tarfile_archive(tarfile.PAX_FORMAT))
    archives.append(write_tar(tmp_path / "l.tar", awkward_entries()).read_bytes())
    parse = _parse()
    taken = 0
    for data in archives:
        for block in _blocks(data):
            if _check(block)[0] == "ok":
                taken += parse(block) is not None
    assert taken > 20  # the compiled parser took the common headers itself


def test_gnu_tar_headers_agree(tmp_path: Path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / ("n" * 150)).write_bytes(b"x" * 1000)
    os.symlink("t" * 200, tmp_path / "src" / "link")
    for fmt in ("gnu", "oldgnu", "ustar", "posix", "v7"):
        out = tmp_path / f"{fmt}.tar"
        names = ["link"] if fmt in ("ustar", "v7") else ["link", "n" * 150]
        run = subprocess.run(
            ["tar", "--format", fmt, "-cf", str(out), "-C", str(tmp_path / "src"), *names],
            capture_output=True,
        )
        if run.returncode != 0:
            continue  # a name this format cannot hold
        for block in _blocks(out.read_bytes()):
            _check(block)


_NUMERIC = [(100, 8), (108, 8), (116, 8), (124, 12), (136, 12), (329, 8), (337, 8)]


@st.composite
def _field(draw, width: int) -> bytes:
    kind = draw(st.sampled_from(["octal", "spaced", "base256", "bytes", "text"]))
    if kind == "octal":
        digits = draw(st.integers(1, width))
        value = draw(st.integers(0, 8**digits - 1))
        text = f"{value:0{digits}o}".encode()
        end = draw(st.sampled_from([b"\0", b" ", b"\0 ", b" \0", b""]))
        return (text + end + bytes(width))[:width]
    if kind == "spaced":
        parts = draw(st.lists(st.sampled_from([b" ", b"\0", b"7", b"0", b"+", b"-", b"_"])))
        return (b"".join(parts) + bytes(width))[:width]
    if kind == "base256":
        lead = draw(st.sampled_from([b"\x80", b"\xff", b"\x81"]))
        return lead + draw(st.binary(min_size=width - 1, max_size=width - 1))
    if kind == "text":
        alphabet = st.sampled_from(b" \t\n\0+-_0123456789abcdefox\x80\xff")
        raw = draw(st.lists(alphabet, min_size=width, max_size=width))
        return bytes(raw)
    return draw(st.binary(min_size=width, max_size=width))


@st.composite
def _header(draw) -> bytes:
    block = bytearray(512)
    block[:100] = (draw(st.binary(max_size=100)) + bytes(100))[:100]
    for offset, width in _NUMERIC:
        block[offset : offset + width] = draw(_field(width))
    block[156] = draw(st.sampled_from(b"0\x0012345677xgLKSDVMX"))
    block[157:257] = (draw(st.binary(max_size=100)) + bytes(100))[:100]
    block[257:265] = draw(st.sampled_from([b"ustar\x0000", b"ustar  \0", bytes(8), b"ustar\0xx"]))
    block[345:500] = (draw(st.binary(max_size=155)) + bytes(155))[:155]
    checksum = draw(st.sampled_from(["unsigned", "signed", "spaced", "field"]))
    block[148:156] = b" " * 8
    unsigned = sum(block)
    signed = sum(b - 256 if b > 127 else b for b in block)
    if checksum == "unsigned":
        block[148:156] = b"%06o\0 " % unsigned
    elif checksum == "signed":
        block[148:156] = b"%06o\0 " % (signed & 0o777777) if signed >= 0 else b"-%05o\0 " % -signed
    elif checksum == "spaced":
        block[148:156] = b"  %o\0" % unsigned + b"\0" * (8 - len(b"  %o\0" % unsigned))
    else:
        block[148:156] = draw(_field(8))
    return bytes(block)


@settings(max_examples=3000, deadline=None)
@given(_header())
def test_generated_headers_agree(block: bytes):
    _check(block)


@settings(max_examples=500, deadline=None)
@given(st.binary(min_size=512, max_size=512))
def test_random_blocks_agree(block: bytes):
    _check(block)


# A member's headers read in place by one call (`_tarhdr.member`, through `view_ahead`) give
# the member a header-by-header read gives, or the same error, wherever the stream's pieces
# end.


class _Trickle:
    """A layer source whose reads return at most `piece` bytes: LayerStream's chunks are
    then that small, and headers lie across their ends."""

    def __init__(self, data: bytes, piece: int) -> None:
        self._data, self._pos, self._piece = data, 0, piece

    def read(self, size: int = -1) -> bytes:
        n = min(self._piece, size if size >= 0 else self._piece)
        out = self._data[self._pos : self._pos + n]
        self._pos += len(out)
        return out


def _members(data: bytes, piece: int) -> tuple:
    """Every member of `data` read through a LayerStream of `piece`-byte chunks, with its
    data, then how the archive ended (the error's class and words, if any)."""
    out: list = []
    try:
        with LayerStream(_Trickle(data, piece)) as stream:
            reader = tarstream.TarReader(stream)
            for m in reader:
                body = bytearray()
                while piece_ := reader.read_data(1 << 20):
                    body += piece_
                out.append((dataclasses.astuple(m), bytes(body), reader.offset))
        return (out, "end")
    except EpError as exc:
        return (out, type(exc).__name__, str(exc))


def _members_with(member, data: bytes, piece: int) -> tuple:
    """`_members` with `tarstream`'s compiled member reader set to MEMBER (None: off),
    whatever EROFS_PASSTHROUGH_PURE made of it."""
    kept, tarstream._member_compiled = tarstream._member_compiled, member
    try:
        return _members(data, piece)
    finally:
        tarstream._member_compiled = kept


def _check_members(data: bytes, pieces=(1 << 20, 1500, 517)) -> tuple:
    member = _module().member
    in_place = [_members_with(member, data, p) for p in pieces]
    by_header = _members_with(None, data, pieces[0])
    for outcome in in_place:
        assert outcome == by_header
    return by_header


def _pax_member(records: bytes, header: tarfile.TarInfo) -> bytes:
    """A PAX header holding `records` (as they are), then `header` and its data, then the
    end of the archive."""
    pax = tarfile.TarInfo("././@PaxHeader")
    pax.type, pax.size = tarfile.XHDTYPE, len(records)
    body = header.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    data = bytes(range(256)) * (header.size // 256 + 1)
    pad = lambda b: b + bytes(-len(b) % 512)  # noqa: E731
    return (
        pax.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
        + pad(records)
        + body
        + pad(data[: header.size])
        + bytes(1024)
    )


def test_members_of_real_archives_agree(tmp_path: Path):
    archives = [p.read_bytes() for p in sorted(GO_TESTDATA.glob("*.tar"))]
    archives += [_tarfile_archive(f) for f in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT)]
    archives.append(_tarfile_archive(tarfile.PAX_FORMAT))
    archives.append(write_tar(tmp_path / "l.tar", awkward_entries()).read_bytes())
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / ("n" * 150)).write_bytes(b"x" * 1000)
    os.symlink("t" * 200, tmp_path / "src" / "link")
    subprocess.run(
        [
            "tar",
            "--format",
            "posix",
            "-cf",
            str(tmp_path / "p.tar"),
            "-C",
            str(tmp_path / "src"),
            ".",
        ],
        check=True,
    )
    archives.append((tmp_path / "p.tar").read_bytes())
    read = sum(len(_check_members(a)[0]) for a in archives)
    assert read > 100  # the archives were read, members among them


_MEMBER_KEYS = [b"path", b"linkpath", b"mtime", b"size", b"uid", b"gid", b"atime", b"uname"]
_MEMBER_KEYS += [b"SCHILY.xattr.user.a", b"SCHILY.xattr.", b"LIBARCHIVE.xattr.user.b"]
_MEMBER_KEYS += [b"GNU.sparse.major", b"GNU.sparse.map", b"comment"]
_VALUES = [b"", b"0", b"7", b"-1", b"-0", b"12.5", b"-3.25", b"1.", b"1.1234567891", b"x\0y"]
_VALUES += [b"4294967295", b"4294967296", b"9223372036854775807", b"99999999999999999999"]
_VALUES += [b"123456789012345678.9", b"a/b", b"+5", b" 5", b"1e3", b"dir/", b"-", b".5", b"-.5"]


@st.composite
def _member_archive(draw) -> bytes:
    records = b""
    for _ in range(draw(st.integers(0, 5))):
        key = draw(st.sampled_from(_MEMBER_KEYS))
        value = draw(st.sampled_from(_VALUES) | st.binary(max_size=6))
        body = b" " + key + b"=" + value + b"\n"
        n = len(body) + 1
        n += len(str(n + len(str(n)) - 1)) - 1
        records += b"%d" % draw(st.sampled_from([n, n, n, n + 1])) + body
    info = tarfile.TarInfo(draw(st.sampled_from(["f", "d/", "a/b/c", "x" * 99])))
    info.type = draw(st.sampled_from([tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE]))
    info.size = draw(st.integers(0, 1500)) if info.type == tarfile.REGTYPE else 0
    info.linkname = "target" if info.type == tarfile.SYMTYPE else ""
    info.mtime, info.uid, info.gid = draw(st.integers(0, 8**11 - 1)), 5, 6
    archive = _pax_member(records, info)
    if draw(st.booleans()):  # and sometimes damaged
        at = draw(st.integers(0, len(archive) - 1))
        flipped = archive[at] ^ draw(st.integers(1, 255))
        archive = archive[:at] + bytes([flipped]) + archive[at + 1 :]
    return archive


def _records(*pairs: tuple[bytes, bytes]) -> bytes:
    out = b""
    for key, value in pairs:
        body = b" " + key + b"=" + value + b"\n"
        n = len(body) + 1
        n += len(str(n + len(str(n)) - 1)) - 1
        out += b"%d" % n + body
    return out


def test_every_record_value_agrees():
    """Each record key with each value, alone and after a first value of the same key (the
    last one counts, an empty one keeps the header's field)."""
    info = tarfile.TarInfo("f")
    info.size, info.mtime = 3, 1_700_000_000
    taken = 0
    for key in _MEMBER_KEYS:
        for value in _VALUES:
            for pairs in ([(key, value)], [(key, b"5"), (key, value)], [(key, value), (key, b"")]):
                archive = _pax_member(_records(*pairs), info)
                taken += _check_members(archive, pieces=(1 << 20,))[1] == "end"
    assert taken > 200


@settings(max_examples=1500, deadline=None)
@given(_member_archive())
def test_generated_pax_members_agree(archive: bytes):
    _check_members(archive, pieces=(1 << 20, 700))


def test_the_common_member_is_read_in_one_call(tmp_path: Path):
    """The members of a PAX layer (every one with a PAX header, as GNU tar's posix format
    writes them) are taken by the compiled call, not header by header."""
    archive = write_tar(tmp_path / "l.tar", awkward_entries()).read_bytes()
    calls = []
    member = _module().member

    def counting(view, at, limit):
        got = member(view, at, limit)
        calls.append(got is not None)
        return got

    members, end = _members_with(counting, archive, 1 << 20)
    assert end == "end" and calls.count(True) >= len(members) // 2 > 5
