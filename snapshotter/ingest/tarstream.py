"""A streaming tar reader: ustar, GNU (long names and links, old sparse) and PAX (path,
linkpath, size, ids, exact mtimes, xattrs, sparse 0.0, 0.1 and 1.0) headers, one member at a
time, with the rules of Go's archive/tar (what containerd's applier reads layers with).

Why not `tarfile`: in stream mode it copies its whole read buffer on every header it parses
and keeps every member it has seen in a list, which made it the slowest part of a layer
conversion and its memory grow with the entry count. This reader keeps nothing but the
current member and hands file data out in large pieces.

Every number is range-checked where it is parsed, and every extension header is bounded
(`Limits.max_header_bytes`) before it is read: a declared size never becomes an allocation.
Sparse members are not expanded here: `TarMember.sparse` lists their data runs and
`read_data` returns only the stored bytes, so holes cost nothing to read.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import mmap
import re
import struct
import threading
import urllib.parse
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol, cast

from snapshotter.accel import compiled
from snapshotter.erofs.limits import DEFAULT_LIMITS, FILE_SIZE_MAX, MTIME_MAX, MTIME_MIN, Limits
from snapshotter.errors import InvalidInput

# The optional compiled header parser (_tarhdr.c): the headers tar writers write, parsed to
# exactly what `TarHeader.unpack_pure` gives, and PAX records to what `parse_pax_pure` gives;
# None for anything else, which the Python parser then judges (and refuses in its words).
# EROFS_PASSTHROUGH_PURE=1 (read at import) forces the pure parser.
_Fields = tuple[bytes, int, int, int, int, int, int, bytes, int, int, bytes]
_tarhdr = compiled("snapshotter.ingest._tarhdr", "member")  # (accel.py)
_parse_compiled: Callable[[bytes], _Fields | None] | None = (
    None if _tarhdr is None else _tarhdr.parse
)
_parse_pax_compiled: Callable[[bytes], dict[bytes, bytes] | None] | None = (
    None if _tarhdr is None else _tarhdr.parse_pax
)
# A member's headers read in place by one call (`_tarhdr.member`): the fields of `TarMember`
# up to its xattrs, its PAX records applied, and the bytes its headers take; None for any
# member it does not take (then `TarReader._next` reads it header by header).
_Member = tuple[bytes, int, int, int, int, int, int, int, bytes, int, int, dict[bytes, bytes], int]
_member_compiled: Callable[[memoryview | bytes, int, int], _Member | None] | None = (
    None if _tarhdr is None else _tarhdr.member
)

#: True when the compiled header parser is in use
ACCELERATED = _parse_compiled is not None

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)

REGULAR = frozenset(b"0\x007")
HARDLINK, SYMLINK, CHRDEV, BLKDEV, DIRECTORY, FIFO = (ord(c) for c in "123456")
GNU_LONGNAME, GNU_LONGLINK, GNU_SPARSE = ord("L"), ord("K"), ord("S")
GNU_DUMPDIR, GNU_VOLHDR, GNU_MULTIVOL = ord("D"), ord("V"), ord("M")
PAX_HEADER, PAX_GLOBAL, SOLARIS_XHDR = ord("x"), ord("g"), ord("X")
HEADER_ONLY = frozenset((HARDLINK, SYMLINK, CHRDEV, BLKDEV, DIRECTORY, FIFO))
# Headers that are not a member of their own (or, old GNU sparse, one `_member` reads more of).
_EXTENSIONS = frozenset(
    (
        GNU_LONGNAME,
        GNU_LONGLINK,
        GNU_SPARSE,
        GNU_VOLHDR,
        GNU_MULTIVOL,
        PAX_HEADER,
        PAX_GLOBAL,
        SOLARIS_XHDR,
    )
)
GNU_MAGIC = b"ustar  \0"

_SPARSE_OFFSET, _SPARSE_NUMBYTES = b"GNU.sparse.offset", b"GNU.sparse.numbytes"
_SPARSE_MAP = b"GNU.sparse.map"
# PAX records an unpacker does not apply (as Go's archive/tar and containerd): the most
# common ones, skipped before the comparisons `_apply_pax` makes for the others.
_PAX_IGNORED = frozenset((b"atime", b"ctime", b"comment", b"charset", b"hdrcharset"))
_OCTAL = re.compile(rb"[0-7]*")
_DECIMAL = re.compile(rb"-?[0-9]{1,19}")
_PAX_TIME = re.compile(rb"(-?[0-9]{1,19})(?:\.([0-9]*))?")


class Readable(Protocol):
    """What tar is read from: `read(n)` gives n bytes (fewer only at the end). A stream that
    also has `read_some(n)` (1 to n bytes, b"" at the end, no copy) and `skip(n)`
    (`LayerStream`) has its file data handed out in its own pieces, without joining them."""

    def read(self, size: int) -> bytes | memoryview: ...


class Viewable(Readable, Protocol):
    """A stream that also lets a parser read the bytes ahead in place (`LayerStream`,
    `MappedTar`): `view_ahead()` is the rest of its current piece, as (view, offset of the
    next byte in it), and `consume(n)` passes over n of those bytes."""

    def view_ahead(self) -> tuple[memoryview, int]: ...
    def consume(self, size: int) -> None: ...


def _number(field_: bytes, what: str) -> int:
    """An octal ASCII number, or GNU base-256 (high bit of the first byte set), as Go's
    archive/tar parses them: spaces and NULs around octal digits are ignored."""
    if field_ and field_[0] & 0x80:
        if field_[0] not in (0x80, 0xFF):
            raise InvalidInput(f"tar header: bad base-256 {what} field")
        value = int.from_bytes(field_[1:], "big")
        if field_[0] == 0xFF:
            value -= 1 << (8 * (len(field_) - 1))
        return value
    text = field_.strip(b" \0").split(b"\0", 1)[0]
    if not _OCTAL.fullmatch(text):
        raise InvalidInput(f"tar header: bad {what} field {field_!r}")
    return int(text, 8) if text else 0


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
    magic: bytes
    raw: bytes

    _STRUCT = struct.Struct("100s8s8s8s12s12s8sc100s8s64x8s8s155s12x")
    _NUMBERS = ("mode", "uid", "gid", "size", "mtime", "devmajor", "devminor")

    @classmethod
    def unpack(cls, block: bytes) -> TarHeader:
        """The header in `block` (512 bytes); EpError for a corrupt one."""
        if _parse_compiled is not None:
            fields = _parse_compiled(block)
            if fields is not None:
                return cls(*fields, block)
        return cls.unpack_pure(block)

    @classmethod
    def unpack_pure(cls, block: bytes) -> TarHeader:
        """`unpack` in pure Python, whatever the accelerator (what the tests compare)."""
        fast = _FAST_NUMBERS.match(block, 100, 156)
        dev = _FAST_DEVICE.match(block, 329, 345) if fast else None
        if fast and dev:  # what tar writers write: fixed-width octal, one regex for all
            mode, uid, gid, size, mtime, expected = map(_octal, fast.groups())
            devmajor = int(dev[1], 8) if dev[1] else 0
            devminor = int(dev[2], 8) if dev[2] else 0
            chksum = block[148:156]
        else:
            mode, uid, gid, size, mtime, devmajor, devminor, chksum = cls._numbers(block)
            try:
                expected = int(chksum.rstrip(b"\0 ") or b"0", 8)
            except ValueError:
                expected = _number(chksum, "checksum")
        if expected != _byte_sum(block) - sum(chksum) + 8 * 32 and expected != _signed_sum(
            block, chksum
        ):
            raise InvalidInput("tar header checksum mismatch (corrupt or not a tar)")
        name = _text(block[:100])
        magic = block[257:265]
        if magic[:6] == b"ustar\0" and block[345]:
            name = _text(block[345:500]) + b"/" + name
        return cls(
            name,
            mode,
            uid,
            gid,
            size,
            mtime,
            block[156],
            _text(block[157:257]),
            devmajor,
            devminor,
            magic,
            block,
        )

    @classmethod
    def _numbers(cls, block: bytes) -> tuple[int, int, int, int, int, int, int, bytes]:
        """The numeric fields of any header Go's archive/tar reads (base-256 included)."""
        (_, mode, uid, gid, size, mtime, chksum, _, _, _, devmajor, devminor, _) = (
            cls._STRUCT.unpack(block)
        )
        fields = (mode, uid, gid, size, mtime, devmajor, devminor)
        try:  # octal, the common case, in one go
            numbers = [int(f.rstrip(b"\0 ") or b"0", 8) for f in fields]
            # int() also takes signs, underscores and leading NULs: let _number judge those.
            if min(numbers) < 0 or b"_" in block[100:156] or b"_" in block[329:345]:
                raise ValueError
        except ValueError:
            numbers = [_number(f, what) for f, what in zip(fields, cls._NUMBERS, strict=True)]
        return (*numbers, chksum)


# The header fields as GNU tar, Python's tarfile and Go write them: mode, uid, gid (7 octal
# digits), size, mtime (11), each ended by a NUL or a space, then the checksum (6 digits, NUL,
# space); device numbers as 7 digits or all NULs. Anything else takes the general parser.
_FAST_NUMBERS = re.compile(
    rb"([0-7]{7})[\0 ]([0-7]{7})[\0 ]([0-7]{7})[\0 ]([0-7]{11})[\0 ]([0-7]{11})[\0 ]([0-7]{6})\0 "
)
_FAST_DEVICE = re.compile(rb"(?:\0{8}|([0-7]{7})[\0 ])(?:\0{8}|([0-7]{7})[\0 ])")


def _octal(digits: bytes) -> int:
    return int(digits, 8)


def _byte_sum(block: bytes) -> int:
    """The sum of a 512-byte block's bytes, exactly, in C: adler32's first half is 1 + the
    byte sum modulo 65521, and the sum of 256 bytes is at most 65280. A quarter of the cost
    of `sum(block)`, which was a tenth of the time of a wide directory's conversion."""
    view = memoryview(block)
    return (zlib.adler32(view[:256]) & 0xFFFF) + (zlib.adler32(view[256:]) & 0xFFFF) - 2


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
    # Sparse files: the (offset, length) data runs, sorted, within `size`; their lengths add
    # up to `stored`, and `read_data` returns their bytes back to back.
    sparse: list[tuple[int, int]] | None = None
    stored: int = 0  # bytes of data in the archive


def parse_pax(data: bytes) -> dict[bytes, bytes]:
    """PAX extended header records: `LEN KEY=VALUE\\n`, values kept as raw bytes (see
    `parse_pax_pure`); EpError for a corrupt header."""
    if _parse_pax_compiled is not None:
        records = _parse_pax_compiled(data)
        if records is not None:
            return records
    return parse_pax_pure(data)


def parse_pax_pure(data: bytes) -> dict[bytes, bytes]:
    """PAX extended header records: `LEN KEY=VALUE\\n`, values kept as raw bytes.

    GNU sparse 0.0 repeats `GNU.sparse.offset`/`GNU.sparse.numbytes` pairs; as Go does, they
    are joined into one 0.1-style `GNU.sparse.map` record."""
    records: dict[bytes, bytes] = {}
    sparse_map: list[bytes] = []
    pos = 0
    while pos < len(data):
        if data[pos] == 0:
            break
        space = data.find(b" ", pos, pos + 21)
        digits = data[pos:space]
        if space < 0 or not digits.isdigit():
            raise InvalidInput("corrupt PAX header record (bad length)")
        length = int(digits)
        end = pos + length
        if length < 5 or end > len(data) or end <= space + 1 or data[end - 1] != 0x0A:
            raise InvalidInput("corrupt PAX header record (length does not match)")
        key, eq, value = data[space + 1 : end - 1].partition(b"=")
        if not eq or not key or b"\0" in key:
            raise InvalidInput("corrupt PAX header record (no key)")
        if key in (b"path", b"linkpath") and b"\0" in value:
            raise InvalidInput(f"PAX {_show(key)} {_show(value[:60])!r} contains a NUL byte")
        if key in (_SPARSE_OFFSET, _SPARSE_NUMBYTES):
            if (key == _SPARSE_OFFSET) != (len(sparse_map) % 2 == 0) or b"," in value:
                raise InvalidInput("corrupt PAX sparse 0.0 map (offset/numbytes out of order)")
            sparse_map.append(value)
        else:
            records[key] = value
        pos = end
    if sparse_map:
        records[_SPARSE_MAP] = b",".join(sparse_map)
    return records


def _pax_time(value: bytes) -> tuple[int, int]:
    match = _PAX_TIME.fullmatch(value)
    if match is None:
        raise InvalidInput(f"bad PAX mtime {value[:40]!r}")
    seconds = int(match[1])
    frac = match[2] or b""
    nsec = int((frac + b"000000000")[:9]) if frac else 0
    if value.startswith(b"-") and nsec:
        seconds, nsec = seconds - 1, 1_000_000_000 - nsec
    return seconds, nsec


def _pax_int(value: bytes, key: bytes, low: int = 0, high: int = FILE_SIZE_MAX) -> int:
    if not _DECIMAL.fullmatch(value):
        raise InvalidInput(f"bad PAX {_show(key)} {value[:40]!r}")
    number = int(value)
    if not low <= number <= high:
        raise InvalidInput(f"PAX {_show(key)} {number} out of range [{low}, {high}]")
    return number


def _show(name: bytes) -> str:
    return name.decode("utf-8", "replace")


class TarReader:
    """Iterates the members of a tar stream; `read_data` gives the current member's data.

    PAX global headers are read (and checked) but not applied: containerd's applier ignores
    them too, so a layer unpacks the same here as there.
    """

    def __init__(self, stream: Readable, limits: Limits = DEFAULT_LIMITS) -> None:
        self._stream = stream
        self._read_some: Callable[[int], bytes | memoryview] = getattr(
            stream, "read_some", stream.read
        )
        self._stream_skip: Callable[[int], int] | None = getattr(stream, "skip", None)
        # Members read in place when both the compiled parser and the stream allow it.
        self._in_place = (
            cast("Viewable", stream)
            if _member_compiled is not None and hasattr(stream, "view_ahead")
            else None
        )
        self._limits = limits
        self._remaining = 0  # data bytes of the current member not read yet
        self._padding = 0
        self.offset = 0  # tar bytes consumed, for error messages

    def _read_exact(self, size: int) -> bytes | memoryview:
        data = self._stream.read(size)
        if len(data) != size:
            raise InvalidInput(
                f"truncated tar: unexpected end of data ({len(data)} of {size} bytes)"
            )
        self.offset += size
        return data

    def _skip(self, size: int) -> None:
        if self._stream_skip is not None:
            skipped = self._stream_skip(size)
            if skipped != size:
                raise InvalidInput(
                    f"truncated tar: unexpected end of data ({skipped} of {size} bytes)"
                )
            self.offset += size
            return
        while size > 0:
            n = min(size, 1 << 20)
            self._read_exact(n)
            size -= n

    def _read_meta(self, size: int, what: str) -> bytes:
        if size > self._limits.max_header_bytes:
            raise InvalidInput(
                f"tar {what} of {size} bytes exceeds the limit of "
                f"{self._limits.max_header_bytes} (max_header_bytes)"
            )
        data = bytes(self._read_exact(size))
        self._skip(-size % BLOCK)
        return data

    def __iter__(self) -> Iterator[TarMember]:
        while True:
            member = self._next()
            if member is None:
                return
            yield member

    def _header_block(self) -> bytes | None:
        """The next header block, or None at the end of the archive.

        As Go's archive/tar: no more data, a lone zero block then no more data, or two zero
        blocks end the archive; a zero block followed by anything else is corrupt (a tar
        reader that stopped there would silently drop the rest of the layer)."""
        block = bytes(self._stream.read(BLOCK))
        if len(block) != BLOCK:
            if not block:
                return None  # no end-of-archive marker: accepted, as GNU tar and Go do
            raise InvalidInput("truncated tar: partial header block")
        if block != ZERO_BLOCK:
            self.offset += BLOCK
            return block
        second = self._stream.read(BLOCK)
        if not second or second == ZERO_BLOCK:
            return None
        if len(second) != BLOCK:
            raise InvalidInput("truncated tar: partial header block")
        raise InvalidInput(
            f"corrupt tar: a zero block at offset {self.offset} is followed by "
            "more headers (only two zero blocks may end an archive)"
        )

    def _next(self) -> TarMember | None:
        if self._remaining or self._padding:
            self._skip(self._remaining + self._padding)
            self._remaining = self._padding = 0
        if self._in_place is not None and _member_compiled is not None:
            view, at = self._in_place.view_ahead()
            got = _member_compiled(view, at, self._limits.max_header_bytes)
            if got is not None:
                used = got[12]
                self._in_place.consume(used)
                self.offset += used
                return self._finish_member(TarMember(*got[:12]), {}, None, None, None)
        pax: dict[bytes, bytes] = {}
        long_name = long_link = None
        while True:
            block = self._header_block()
            if block is None:
                return None
            fields = _parse_compiled(block) if _parse_compiled is not None else None
            if fields is not None:
                # The compiled parser's fields, used as they are for the headers every layer
                # is made of (a member, a PAX header): no TarHeader built for them.
                flag = fields[6]
                size = fields[4]
                if size > FILE_SIZE_MAX:  # never negative: octal digits
                    raise InvalidInput(
                        f"tar header {_show(fields[0][:100])!r}: size {size} out of range"
                    )
                if flag not in _EXTENSIONS:
                    m = TarMember(
                        fields[0],
                        flag,
                        fields[1] & 0o7777,
                        fields[2],
                        fields[3],
                        size,
                        fields[5],
                        0,
                        fields[7],
                        fields[8],
                        fields[9],
                    )
                    return self._finish_member(m, pax, long_name, long_link, None)
                if flag == PAX_HEADER:
                    pax = parse_pax(self._read_meta(size, "PAX header"))
                    continue
                header = TarHeader(*fields, block)
            else:
                header = TarHeader.unpack_pure(block)
            if not 0 <= header.size <= FILE_SIZE_MAX:
                raise InvalidInput(
                    f"tar header {_show(header.name[:100])!r}: size {header.size} out of range"
                )
            flag = header.typeflag
            if flag == GNU_LONGNAME:
                long_name = _text(self._read_meta(header.size, "long name"))
            elif flag == GNU_LONGLINK:
                long_link = _text(self._read_meta(header.size, "long link"))
            elif flag in (PAX_HEADER, SOLARIS_XHDR):
                pax = parse_pax(self._read_meta(header.size, "PAX header"))
            elif flag == PAX_GLOBAL:
                parse_pax(self._read_meta(header.size, "PAX global header"))  # checked only
            elif flag == GNU_VOLHDR:
                self._skip(header.size + (-header.size % BLOCK))
            elif flag == GNU_MULTIVOL:
                raise InvalidInput("multi-volume tar archives are not supported")
            else:
                return self._member(header, pax, long_name, long_link)

    def _member(
        self,
        h: TarHeader,
        pax: dict[bytes, bytes],
        long_name: bytes | None,
        long_link: bytes | None,
    ) -> TarMember:
        m = TarMember(
            name=h.name,
            typeflag=h.typeflag,
            mode=h.mode & 0o7777,
            uid=h.uid,
            gid=h.gid,
            size=h.size,
            mtime=h.mtime,
            mtime_nsec=0,
            linkname=h.linkname,
            devmajor=h.devmajor,
            devminor=h.devminor,
        )
        return self._finish_member(
            m, pax, long_name, long_link, h if h.typeflag == GNU_SPARSE else None
        )

    def _finish_member(
        self,
        m: TarMember,
        pax: dict[bytes, bytes],
        long_name: bytes | None,
        long_link: bytes | None,
        gnu_sparse: TarHeader | None,
    ) -> TarMember:
        """The member with its extension headers applied and its data accounted for;
        `gnu_sparse`: the header of an old GNU sparse member, whose map it holds."""
        if pax:
            self._apply_pax(m, pax)
        if long_name is not None:  # Go's order: GNU long names win over PAX paths
            m.name = long_name
        if long_link is not None:
            m.linkname = long_link
        if m.typeflag == 0 and m.name.endswith(b"/"):
            m.typeflag = DIRECTORY  # pre-POSIX archives mark directories so (as Go reads them)
        if not MTIME_MIN <= m.mtime <= MTIME_MAX:
            raise InvalidInput(f"{_show(m.name)!r}: mtime {m.mtime} out of range")
        stored = 0 if m.typeflag in HEADER_ONLY else m.size  # bytes of data in the archive
        if gnu_sparse is not None:
            m.sparse, m.size = self._gnu_sparse_map(gnu_sparse)
        elif pax and (sparse := self._pax_sparse(m, pax)) is not None:
            m.sparse, used = sparse
            stored -= used
        if m.sparse is not None:
            _check_sparse_map(m, stored)
            m.typeflag = GNU_SPARSE
        if m.typeflag in HEADER_ONLY:
            m.size = 0  # no data, whatever the size field says (as tar unpackers do)
        elif m.typeflag == GNU_DUMPDIR:
            m.typeflag = DIRECTORY  # its data (a listing for incremental dumps) is skipped
            m.size = 0
        m.stored = stored
        self._remaining = stored
        self._padding = -stored % BLOCK
        return m

    def _apply_pax(self, m: TarMember, pax: dict[bytes, bytes]) -> None:
        for key, value in pax.items():
            if key in _PAX_IGNORED:
                continue
            if not value and not key.startswith((b"SCHILY.xattr.", b"LIBARCHIVE.xattr.")):
                continue  # an empty record keeps the header's value (Go: "keep USTAR")
            if key == b"path":
                m.name = value
            elif key == b"linkpath":
                m.linkname = value
            elif key == b"size":
                m.size = _pax_int(value, key)
            elif key in (b"uid", b"gid"):
                setattr(m, key.decode(), _pax_int(value, key, 0, 0xFFFFFFFF))
            elif key == b"mtime":
                m.mtime, m.mtime_nsec = _pax_time(value)
            elif key.startswith(b"SCHILY.xattr."):
                m.xattrs[key[len(b"SCHILY.xattr.") :]] = value
            elif key.startswith(b"LIBARCHIVE.xattr."):
                name = urllib.parse.unquote_to_bytes(key[len(b"LIBARCHIVE.xattr.") :])
                padded = value + b"=" * (-len(value) % 4)
                try:
                    decoded = base64.b64decode(padded, validate=True)
                except (ValueError, binascii.Error):
                    raise InvalidInput(
                        f"{_show(m.name)!r}: bad base64 in LIBARCHIVE xattr {_show(name)!r}"
                    ) from None
                m.xattrs.setdefault(name, decoded)

    def _pax_sparse(
        self, m: TarMember, pax: dict[bytes, bytes]
    ) -> tuple[list[tuple[int, int]], int] | None:
        """GNU's PAX sparse formats, told apart as Go's archive/tar does: (runs, bytes of the
        stored data the map took), or None for a member that is not sparse."""
        major, minor = pax.get(b"GNU.sparse.major"), pax.get(b"GNU.sparse.minor")
        if major == b"0" and minor in (b"0", b"1"):
            is_1x0 = False
        elif major == b"1" and minor == b"0":
            is_1x0 = True
        elif major is not None or minor is not None:
            raise InvalidInput(
                f"{_show(m.name)!r}: unknown GNU sparse format "
                f"{_show(major or b'')}.{_show(minor or b'')}"
            )
        elif pax.get(_SPARSE_MAP):
            is_1x0 = False  # 0.0 and 0.1 have no version records
        else:
            return None
        if name := pax.get(b"GNU.sparse.name"):
            m.name = name
        size = pax.get(b"GNU.sparse.size") or pax.get(b"GNU.sparse.realsize")
        if size:
            m.size = _pax_int(size, b"GNU.sparse.size")
        if is_1x0:
            return self._sparse_map_1x0()
        count = _pax_int(pax.get(b"GNU.sparse.numblocks", b""), b"GNU.sparse.numblocks")
        numbers = pax.get(_SPARSE_MAP, b"").split(b",") if pax.get(_SPARSE_MAP) else []
        if len(numbers) != 2 * count:
            raise InvalidInput(
                f"{_show(m.name)!r}: GNU sparse map has {len(numbers)} numbers for {count} entries"
            )
        values = [_pax_int(v, _SPARSE_MAP) for v in numbers]
        return list(zip(values[::2], values[1::2], strict=True)), 0

    def _gnu_sparse_map(self, h: TarHeader) -> tuple[list[tuple[int, int]], int]:
        """Old GNU sparse: 4 entries in the header, 21 more in each extension block."""
        if h.magic != GNU_MAGIC:
            raise InvalidInput(f"{_show(h.name)!r}: sparse member in a non-GNU header")
        raw = h.raw
        runs = _sparse_entries(raw[386 : 386 + 96])
        isextended = raw[482]
        realsize = _number(raw[483:495], "realsize")
        if not 0 <= realsize <= FILE_SIZE_MAX:
            raise InvalidInput(f"{_show(h.name)!r}: sparse real size {realsize} out of range")
        used = 0
        while isextended:
            used += BLOCK
            if used > self._limits.max_header_bytes:
                raise InvalidInput(
                    f"{_show(h.name)!r}: GNU sparse map exceeds the limit of "
                    f"{self._limits.max_header_bytes} bytes (max_header_bytes)"
                )
            ext = bytes(self._read_exact(BLOCK))
            runs += _sparse_entries(ext[:504])
            isextended = ext[504]
        return runs, realsize

    def _sparse_map_1x0(self) -> tuple[list[tuple[int, int]], int]:
        """PAX sparse 1.0: decimal lines at the start of the data, in whole blocks."""
        buf = bytearray()
        lines: list[bytearray] = []  # pieces of `buf.split`, the next line last
        used = 0

        def line() -> int:
            nonlocal used
            while not lines:
                if used >= self._limits.max_header_bytes:
                    raise InvalidInput(
                        "PAX sparse map exceeds the limit of "
                        f"{self._limits.max_header_bytes} bytes (max_header_bytes)"
                    )
                block = bytes(self._read_exact(BLOCK))
                used += BLOCK
                buf.extend(block)
                if b"\n" in block:
                    *complete, rest = buf.split(b"\n")
                    lines.extend(reversed(complete))
                    buf[:] = rest
                elif len(buf) > 2 * BLOCK:  # no number is this long
                    raise InvalidInput("corrupt PAX sparse map (a line without an end)")
            text = lines.pop()
            if not _DECIMAL.fullmatch(text) or int(text) < 0:
                raise InvalidInput(f"corrupt PAX sparse map (bad number {bytes(text[:40])!r})")
            return int(text)

        count = line()
        if count * 2 * 2 > self._limits.max_header_bytes:  # at least "0\n" per number
            raise InvalidInput(f"PAX sparse map of {count} entries is too large")
        runs = [(line(), line()) for _ in range(count)]
        return runs, used

    def read_data(self, size: int) -> bytes | memoryview:
        """Between 1 and `size` bytes of the current member's stored data (b"" once it is
        all read): the stream's own pieces where it can hand them out without a copy."""
        size = min(size, self._remaining)
        if size <= 0:
            return b""
        data = self._read_some(size)
        if not data:
            raise InvalidInput(f"truncated tar: unexpected end of data (0 of {size} bytes)")
        got = len(data)
        self.offset += got
        self._remaining -= got
        if not self._remaining and self._padding:
            self._skip(self._padding)  # the member's padding, taken with its last piece
            self._padding = 0
        return data


# A plain tar in a regular file is read through mmap windows of this many bytes (the reader's),
# hashed through windows of HASH_WINDOW (the hashing thread's): what is mapped at a time, so
# the process's resident set does not grow with the layer (mapped file pages count in it: with
# 64 MiB windows a minbase conversion peaked at 113 MB, with 8 MiB at 48 MB, 42 MB streamed).
WINDOW = 8 << 20
HASH_WINDOW = 8 << 20


class MappedTar:
    """A plain (uncompressed) tar in a regular file, from offset `start` to `end`, read
    through mmap windows: headers and file data are handed out as memoryviews of the page
    cache, so file data is never copied into user space (DataWriter's writev copies it once,
    kernel-side, from the mapping into the image), and no producer thread or queue stands
    between the file and the reader. The sha256 of the tar (the diffID, and the blob digest:
    they are the same bytes) is computed by a thread over its own windows while the tar is
    read (hashlib releases the GIL on large updates); `finish()` waits for it.

    The same `read` / `read_some` / `skip` interface as `LayerStream`, and the same result.
    The file must not shrink while it is read (a mapped page past the end of a truncated
    file is SIGBUS): content-store blobs and layer files are not rewritten in place.
    """

    compression = "none"

    def __init__(self, fd: int, start: int, end: int) -> None:
        self._fd = fd
        self._pos = start  # file offset of the next byte read
        self._end = end
        self._win_start = 0
        self._win = memoryview(b"")
        self.tar_size = end - start
        self._hash = hashlib.sha256()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._complete = False  # the hash covers the whole tar
        self._digest: str | None = None
        self._thread = threading.Thread(
            target=self._hash_all, args=(start, end), name="tar-hash", daemon=True
        )
        self._thread.start()

    def _hash_all(self, start: int, end: int) -> None:
        try:
            pos = start
            while pos < end and not self._stop.is_set():
                base = pos - pos % mmap.ALLOCATIONGRANULARITY
                length = min(HASH_WINDOW, end - base)
                with mmap.mmap(self._fd, length, prot=mmap.PROT_READ, offset=base) as m:
                    view = memoryview(m)
                    self._hash.update(view[pos - base :])
                    view.release()
                pos = base + length
            self._complete = pos >= end
        except BaseException as exc:  # raised by finish()
            self._error = exc

    def _map(self, pos: int) -> None:
        base = pos - pos % mmap.ALLOCATIONGRANULARITY
        length = min(WINDOW, self._end - base)
        # The old window stays mapped only as long as pieces handed out from it are held.
        m = mmap.mmap(self._fd, length, prot=mmap.PROT_READ, offset=base)
        m.madvise(mmap.MADV_SEQUENTIAL)
        self._win = memoryview(m)
        self._win_start = base

    def read_some(self, size: int) -> memoryview | bytes:
        """Between 1 and `size` bytes (empty only at the end), without a copy."""
        if size <= 0:
            return b""
        win, off = self.view_ahead()
        n = min(size, len(win) - off)
        self._pos += n
        return win[off : off + n]

    def read(self, size: int) -> memoryview | bytes:
        """`size` bytes (fewer only at the end)."""
        pos = self._pos
        off = pos - self._win_start
        if off >= 0 and off + size <= len(self._win) and size > 0:  # within the window
            self._pos = pos + size
            return self._win[off : off + size]
        first = self.read_some(size)
        if len(first) == size or not first:
            return first
        parts = [first]  # across a window's end
        got = len(first)
        while got < size and (piece := self.read_some(size - got)):
            parts.append(piece)
            got += len(piece)
        return b"".join(parts)

    def skip(self, size: int) -> int:
        n = max(0, min(size, self._end - self._pos))
        self._pos += n
        return n

    def view_ahead(self) -> tuple[memoryview, int]:
        """The rest of the current window (mapped anew at its end), and where the next byte
        is in it; empty at the end."""
        pos = self._pos
        if pos >= self._end:
            return memoryview(b""), 0
        off = pos - self._win_start
        if not 0 <= off < len(self._win):
            self._map(pos)
            off = pos - self._win_start
        return self._win, off

    def consume(self, size: int) -> None:
        """Pass over `size` bytes of what `view_ahead` gave."""
        self._pos += size

    def finish(self) -> str:
        """Wait for the hashing thread; the tar's digest ("sha256:...")."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        if not self._complete:
            raise RuntimeError("MappedTar: the digest was asked for after close()")
        if self._digest is None:
            self._digest = "sha256:" + self._hash.hexdigest()
        return self._digest

    def close(self) -> None:
        """Stop the hashing thread (on an error path) and wait for it."""
        self._stop.set()
        self._thread.join()
        self._win = memoryview(b"")

    @property
    def diff_id(self) -> str:
        return self.finish()

    @property
    def compressed_digest(self) -> str:
        return self.finish()


def _sparse_entries(raw: bytes) -> list[tuple[int, int]]:
    runs = []
    for i in range(0, len(raw), 24):
        offset, numbytes = raw[i : i + 12], raw[i + 12 : i + 24]
        if offset[0] == 0:  # the end of the entries, as GNU, BSD tar and Go read it
            break
        runs.append((_number(offset, "sparse offset"), _number(numbytes, "sparse length")))
    return runs


def _check_sparse_map(m: TarMember, stored: int) -> None:
    """Go's validateSparseEntries, plus: the runs must account for exactly the stored data
    (Go fails the read with "missing data" or "unreferenced data" otherwise)."""
    if m.typeflag in HEADER_ONLY:
        raise InvalidInput(f"{_show(m.name)!r}: a sparse map on a member that has no data")
    if not 0 <= m.size <= FILE_SIZE_MAX:
        raise InvalidInput(f"{_show(m.name)!r}: sparse file size {m.size} out of range")
    end = 0
    total = 0
    for offset, length in m.sparse or ():
        if offset < 0 or length < 0:
            raise InvalidInput(f"{_show(m.name)!r}: negative offset or length in the sparse map")
        if offset < end:
            raise InvalidInput(f"{_show(m.name)!r}: sparse map regions overlap or are out of order")
        end = offset + length
        total += length
        if end > m.size:
            raise InvalidInput(
                f"{_show(m.name)!r}: sparse map reaches {end}, beyond the file size {m.size}"
            )
    if total != stored:
        raise InvalidInput(
            f"{_show(m.name)!r}: sparse map describes {total} bytes of data, the "
            f"archive stores {stored}"
        )
    m.sparse = [run for run in m.sparse or () if run[1]]
