"""A streaming tar reader: ustar, GNU (long names and links, old sparse) and PAX (path,
linkpath, size, ids, exact mtimes, xattrs, sparse 1.0) headers, one member at a time.

Why not `tarfile`: in stream mode it copies its whole read buffer on every header it parses
and keeps every member it has seen in a list, which made it the slowest part of a layer
conversion and its memory grow with the entry count. This reader keeps nothing but the
current member and hands file data out in large pieces.
"""

from __future__ import annotations

import base64
import struct
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from snapshotter.errors import EpError

BLOCK = 512

REGULAR = frozenset(b"0\x007")
HARDLINK, SYMLINK, CHRDEV, BLKDEV, DIRECTORY, FIFO = (ord(c) for c in "123456")
GNU_LONGNAME, GNU_LONGLINK, GNU_SPARSE = ord("L"), ord("K"), ord("S")
GNU_DUMPDIR, GNU_VOLHDR, GNU_MULTIVOL = ord("D"), ord("V"), ord("M")
PAX_HEADER, PAX_GLOBAL, SOLARIS_XHDR = ord("x"), ord("g"), ord("X")
GNU_SPARSE_MAJOR = b"GNU.sparse.major"
META_LIMIT = 16 << 20  # long names, links and PAX records larger than this are refused


class Readable(Protocol):
    def read(self, size: int) -> bytes: ...


def _number(field_: bytes, what: str) -> int:
    """An octal ASCII number, or GNU base-256 (high bit of the first byte set)."""
    try:
        return int(field_.rstrip(b"\0 ") or b"0", 8)  # the common case, fast
    except ValueError:
        pass
    if field_ and field_[0] & 0x80:
        value = int.from_bytes(field_[1:], "big")
        if field_[0] == 0xFF:
            value -= 1 << (8 * (len(field_) - 1))
        elif field_[0] != 0x80:
            raise EpError(f"tar header: bad base-256 {what}")
        return value
    text = field_.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise EpError(f"tar header: bad {what} field {field_!r}") from None


def _text(field_: bytes) -> bytes:
    return field_.split(b"\0", 1)[0]


@dataclass
class TarHeader:
    """One 512-byte header block (ustar layout; GNU's fields where GNU puts them)."""

    name: bytes
    mode: int
    uid: int
    gid: int
    size: int
    mtime: int
    typeflag: int
    linkname: bytes
    devmajor: int
    devminor: int
    raw: bytes

    _STRUCT = struct.Struct("100s8s8s8s12s12s8sc100s6s2x64x8s8s155s12x")
    _NUMBERS = ("mode", "uid", "gid", "size", "mtime", "devmajor", "devminor")

    @classmethod
    def unpack(cls, block: bytes) -> TarHeader:
        (name, mode, uid, gid, size, mtime, chksum, typeflag, linkname, magic,
         devmajor, devminor, prefix) = cls._STRUCT.unpack(block)
        fields = (mode, uid, gid, size, mtime, devmajor, devminor)
        try:  # octal, the common case, in one go
            numbers = [int(f.rstrip(b"\0 ") or b"0", 8) for f in fields]
        except ValueError:
            numbers = [_number(f, what) for f, what in zip(fields, cls._NUMBERS, strict=True)]
        expected = _number(chksum, "checksum")
        if expected != sum(block) - sum(chksum) + 8 * 32 and expected != _signed_sum(
                block, chksum):
            raise EpError("tar header checksum mismatch (corrupt or not a tar)")
        name = _text(name)
        if magic == b"ustar\0" and prefix[0]:
            name = _text(prefix) + b"/" + name
        return cls(name, numbers[0], numbers[1], numbers[2], numbers[3], numbers[4],
                   typeflag[0], _text(linkname), numbers[5], numbers[6], block)


def _signed_sum(block: bytes, chksum: bytes) -> int:
    total = sum(b - 256 if b > 127 else b for b in block)
    return total - sum(b - 256 if b > 127 else b for b in chksum) + 8 * 32


@dataclass
class TarMember:
    """A member as an unpacker sees it, all extension headers applied."""

    name: bytes
    typeflag: int
    mode: int
    uid: int
    gid: int
    size: int  # the file's size (for sparse files: the expanded size)
    mtime: int
    mtime_nsec: int
    linkname: bytes
    devmajor: int
    devminor: int
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    sparse: list[tuple[int, int]] | None = None  # (offset, length) of data runs
    stored: int = 0  # bytes of data in the archive


def parse_pax(data: bytes) -> dict[bytes, bytes]:
    """PAX extended header records: `LEN KEY=VALUE\\n`, values kept as raw bytes."""
    records: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:
            break
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space])
        except ValueError:
            raise EpError("corrupt PAX header record") from None
        record = data[space + 1:pos + length]
        if length <= 0 or not record.endswith(b"\n") or b"=" not in record:
            raise EpError("corrupt PAX header record")
        key, _, value = record[:-1].partition(b"=")
        records[key] = value
        pos += length
    return records


def _pax_time(value: bytes) -> tuple[int, int]:
    text = value.decode("ascii", "replace")
    sec, _, frac = text.partition(".")
    try:
        seconds = int(sec)
        nsec = int((frac + "000000000")[:9]) if frac else 0
    except ValueError:
        raise EpError(f"bad PAX mtime {text!r}") from None
    if text.startswith("-") and nsec:
        seconds, nsec = seconds - 1, 1_000_000_000 - nsec
    return seconds, nsec


def _pax_int(value: bytes, key: bytes) -> int:
    try:
        return int(value)
    except ValueError:
        raise EpError(f"bad PAX {key.decode()} {value!r}") from None


class TarReader:
    """Iterates the members of a tar stream; `read_data` gives the current member's data."""

    def __init__(self, stream: Readable) -> None:
        self._stream = stream
        self._remaining = 0  # data bytes of the current member not read yet
        self._padding = 0
        self._globals: dict[bytes, bytes] = {}

    def _read_exact(self, size: int) -> bytes:
        data = self._stream.read(size)
        if len(data) != size:
            raise EpError(f"truncated tar: unexpected end of data ({len(data)} of {size} "
                          "bytes)")
        return data

    def _skip(self, size: int) -> None:
        while size:
            n = min(size, 1 << 20)
            self._read_exact(n)
            size -= n

    def _read_meta(self, size: int, what: str) -> bytes:
        if size > META_LIMIT:
            raise EpError(f"tar {what} of {size} bytes is too large")
        data = self._read_exact(size)
        self._skip(-size % BLOCK)
        return data

    def __iter__(self) -> Iterator[TarMember]:
        while True:
            member = self._next()
            if member is None:
                return
            yield member

    def _next(self) -> TarMember | None:
        if self._remaining or self._padding:
            self._skip(self._remaining + self._padding)
            self._remaining = self._padding = 0
        pax: dict[bytes, bytes] = {}
        long_name = long_link = None
        while True:
            block = self._stream.read(BLOCK)
            if not block:
                return None  # no end-of-archive marker: accepted, as GNU tar does
            if len(block) != BLOCK:
                raise EpError("truncated tar: partial header block")
            if block == bytes(BLOCK):
                return None  # end of archive (the rest is drained by the caller)
            header = TarHeader.unpack(block)
            flag = header.typeflag
            if flag == GNU_LONGNAME:
                long_name = _text(self._read_meta(header.size, "long name"))
            elif flag == GNU_LONGLINK:
                long_link = _text(self._read_meta(header.size, "long link"))
            elif flag in (PAX_HEADER, SOLARIS_XHDR):
                pax.update(parse_pax(self._read_meta(header.size, "PAX header")))
            elif flag == PAX_GLOBAL:
                self._globals.update(parse_pax(self._read_meta(header.size, "PAX header")))
            elif flag == GNU_VOLHDR:
                self._skip(header.size + (-header.size % BLOCK))
            elif flag == GNU_MULTIVOL:
                raise EpError("multi-volume tar archives are not supported")
            else:
                return self._member(header, {**self._globals, **pax}, long_name, long_link)

    def _member(self, h: TarHeader, pax: dict[bytes, bytes], long_name: bytes | None,
                long_link: bytes | None) -> TarMember:
        m = TarMember(
            name=long_name if long_name is not None else h.name,
            typeflag=h.typeflag, mode=h.mode & 0o7777, uid=h.uid, gid=h.gid, size=h.size,
            mtime=h.mtime, mtime_nsec=0,
            linkname=long_link if long_link is not None else h.linkname,
            devmajor=h.devmajor, devminor=h.devminor,
        )
        if h.typeflag == GNU_SPARSE:
            m.sparse, m.size = self._gnu_sparse_map(h)
        self._apply_pax(m, pax)
        stored = m.size if b"size" in pax else h.size  # bytes of data in the archive
        if GNU_SPARSE_MAJOR in pax:
            if pax[GNU_SPARSE_MAJOR] != b"1":
                raise EpError("only PAX sparse format 1.0 is supported")
            m.name = pax.get(b"GNU.sparse.name", m.name)
            m.size = _pax_int(pax.get(b"GNU.sparse.realsize", b"0"), b"GNU.sparse.realsize")
            m.typeflag = GNU_SPARSE
            m.sparse, used = self._pax_sparse_map()
            stored -= used
        if h.typeflag in (HARDLINK, SYMLINK, CHRDEV, BLKDEV, DIRECTORY, FIFO):
            stored = 0  # no data, whatever the size field says (as tar unpackers do)
            m.size = 0
        elif h.typeflag == GNU_DUMPDIR:
            m.typeflag = DIRECTORY  # its data (a listing for incremental dumps) is skipped
            m.size = 0
        m.stored = stored
        self._remaining = stored
        self._padding = -stored % BLOCK
        return m

    def _apply_pax(self, m: TarMember, pax: dict[bytes, bytes]) -> None:
        for key, value in pax.items():
            if key == b"path":
                m.name = value
            elif key == b"linkpath":
                m.linkname = value
            elif key == b"size":
                m.size = _pax_int(value, key)
            elif key == b"uid":
                m.uid = _pax_int(value, key)
            elif key == b"gid":
                m.gid = _pax_int(value, key)
            elif key == b"mtime":
                m.mtime, m.mtime_nsec = _pax_time(value)
            elif key.startswith(b"SCHILY.xattr."):
                m.xattrs[key[len(b"SCHILY.xattr."):]] = value
            elif key.startswith(b"LIBARCHIVE.xattr."):
                name = urllib.parse.unquote_to_bytes(key[len(b"LIBARCHIVE.xattr."):])
                padded = value + b"=" * (-len(value) % 4)
                try:
                    m.xattrs.setdefault(name, base64.b64decode(padded))
                except ValueError:
                    raise EpError(f"bad LIBARCHIVE xattr {name!r}") from None

    def _gnu_sparse_map(self, h: TarHeader) -> tuple[list[tuple[int, int]], int]:
        """Old GNU sparse: 4 entries in the header, more in extension blocks."""
        raw = h.raw
        runs = _sparse_entries(raw[386:386 + 96])
        isextended = raw[482]
        realsize = _number(raw[483:495], "realsize")
        while isextended:
            ext = self._read_exact(BLOCK)
            runs += _sparse_entries(ext[:504])
            isextended = ext[504]
        return runs, realsize

    def _pax_sparse_map(self) -> tuple[list[tuple[int, int]], int]:
        """PAX sparse 1.0: the map is decimal lines at the start of the data."""
        buf = b""
        used = 0

        def line() -> int:
            nonlocal buf, used
            while b"\n" not in buf:
                block = self._read_exact(BLOCK)
                used += BLOCK
                buf += block
                if len(buf) > META_LIMIT:
                    raise EpError("PAX sparse map too large")
            text, _, buf = buf.partition(b"\n")
            try:
                return int(text)
            except ValueError:
                raise EpError("corrupt PAX sparse map") from None

        count = line()
        runs = [(line(), line()) for _ in range(count)]
        return runs, used

    def read_data(self, size: int) -> bytes:
        """Up to `size` bytes of the current member's stored data."""
        size = min(size, self._remaining)
        if size <= 0:
            return b""
        if size == self._remaining and self._padding:
            # The member's last piece: take its padding in the same read.
            data = self._read_exact(size + self._padding)[:size]
            self._padding = 0
        else:
            data = self._read_exact(size)
        self._remaining -= size
        return data

    def data_reader(self, member: TarMember) -> Callable[[int], bytes]:
        """`read(n)` over the member's logical contents (sparse holes read as zeros)."""
        if member.sparse is None:
            return self.read_data
        return _SparseReader(self, member).read



def _sparse_entries(raw: bytes) -> list[tuple[int, int]]:
    runs = []
    for i in range(0, len(raw), 24):
        offset, numbytes = raw[i:i + 12], raw[i + 12:i + 24]
        if not offset.strip(b"\0"):
            break
        runs.append((_number(offset, "sparse offset"), _number(numbytes, "sparse length")))
    return runs


class _SparseReader:
    """Expands a sparse member: data runs from the archive, zeros in between."""

    def __init__(self, reader: TarReader, member: TarMember) -> None:
        self._reader = reader
        self._runs = [r for r in member.sparse or [] if r[1]]
        self._size = member.size
        self._pos = 0
        for (a, la), (b, _) in zip(self._runs, self._runs[1:], strict=False):
            if a + la > b:
                raise EpError(f"{member.name!r}: overlapping sparse map")
        if self._runs and self._runs[-1][0] + self._runs[-1][1] > self._size:
            raise EpError(f"{member.name!r}: sparse map beyond the file size")

    def read(self, size: int) -> bytes:
        out = []
        while size and self._pos < self._size:
            if self._runs and self._pos >= self._runs[0][0]:
                offset, length = self._runs[0]
                n = min(size, offset + length - self._pos)
                data = self._reader.read_data(n)
                if len(data) != n:
                    raise EpError("truncated tar: sparse data ends early")
                self._pos += n
                if self._pos == offset + length:
                    self._runs.pop(0)
            else:
                next_data = self._runs[0][0] if self._runs else self._size
                n = min(size, next_data - self._pos)
                data = bytes(n)
                self._pos += n
            out.append(data)
            size -= len(data)
        return b"".join(out)
