"""Hand-made tar bytes for hostile and unusual archives that no tar tool writes: fields set
to exactly the bytes a test wants (negative octal, base-256, huge sizes), PAX records of any
content, sparse maps declaring any size. Checksums are always right, so what a reader
refuses is the content, not the framing."""

from __future__ import annotations

BLOCK = 512


def field(value: int | bytes, width: int) -> bytes:
    """An octal field (NUL-terminated), or `value` as given when it is bytes."""
    if isinstance(value, bytes):
        return value.ljust(width, b"\0")[:width]
    return (b"%0*o" % (width - 1, value) + b"\0")[-width:]


def base256(value: int, width: int) -> bytes:
    """GNU base-256: 0x80 then big-endian for >= 0, two's complement (0xFF...) below."""
    if value >= 0:
        return b"\x80" + value.to_bytes(width - 1, "big")
    return (value % (1 << (8 * width))).to_bytes(width, "big")


def header(
    name: bytes,
    *,
    size: int | bytes = 0,
    typeflag: bytes = b"0",
    mode: int | bytes = 0o644,
    uid: int | bytes = 0,
    gid: int | bytes = 0,
    mtime: int | bytes = 1_700_000_000,
    linkname: bytes = b"",
    devmajor: int | bytes = 0,
    devminor: int | bytes = 0,
    gnu: bool = False,
    gnu_sparse: bytes = b"",
) -> bytes:
    """One 512-byte header block; `gnu` writes GNU's magic, `gnu_sparse` its sparse area
    (bytes 386..495: 4 entries, isextended, realsize)."""
    magic = b"ustar  \0" if gnu else b"ustar\x0000"
    block = bytearray(BLOCK)
    block[0:100] = name.ljust(100, b"\0")[:100]
    block[100:108] = field(mode, 8)
    block[108:116] = field(uid, 8)
    block[116:124] = field(gid, 8)
    block[124:136] = field(size, 12)
    block[136:148] = field(mtime, 12)
    block[148:156] = b" " * 8
    block[156:157] = typeflag
    block[157:257] = linkname.ljust(100, b"\0")[:100]
    block[257:265] = magic
    if gnu_sparse:
        block[386 : 386 + len(gnu_sparse)] = gnu_sparse
    else:
        block[329:337] = field(devmajor, 8)
        block[337:345] = field(devminor, 8)
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % BLOCK)


def pax_records(records: list[tuple[bytes, bytes]]) -> bytes:
    out = b""
    for key, value in records:
        body = b" " + key + b"=" + value + b"\n"
        length = len(body) + 1
        while len(str(length).encode()) + len(body) != length:
            length += 1
        out += str(length).encode() + body
    return out


def pax(records: list[tuple[bytes, bytes]], typeflag: bytes = b"x") -> bytes:
    """A PAX extended (`x`) or global (`g`) header with its records."""
    data = pax_records(records)
    return header(b"PaxHeaders/x", size=len(data), typeflag=typeflag) + padded(data)


def member(name: bytes, data: bytes = b"", **fields) -> bytes:
    return header(name, size=len(data), **fields) + padded(data)


def end() -> bytes:
    return bytes(2 * BLOCK)


def pax_sparse_1x0(name: bytes, size: int, runs: list[tuple[int, bytes]]) -> bytes:
    """A GNU PAX sparse 1.0 member: `size` bytes long, `runs` of (offset, data), the rest
    holes. The map is decimal lines in whole blocks before the data, as GNU tar writes it."""
    sparse_map = padded(
        b"%d\n" % len(runs) + b"".join(b"%d\n%d\n" % (off, len(d)) for off, d in runs)
    )
    stored = sparse_map + b"".join(d for _, d in runs)
    return pax(
        [
            (b"GNU.sparse.major", b"1"),
            (b"GNU.sparse.minor", b"0"),
            (b"GNU.sparse.name", name),
            (b"GNU.sparse.realsize", b"%d" % size),
        ]
    ) + member(b"GNUSparseFile.0/" + name, stored)
