"""EROFS on-disk structures: one class per structure, its `pack`/`unpack` the only definition
of its bytes, shared by the writer and the reader so they cannot drift.

Field layout follows the kernel's `fs/erofs/erofs_fs.h`. We write only what Linux 6.1 (the
guest kernel) understands: no compression, no 48-bit addressing, no per-inode mtime in compact
inodes (6.1 gives every compact inode the superblock's build time), and no xattr name filter.
"""

from __future__ import annotations

import mmap
import stat
import struct
from bisect import bisect_left, insort
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from snapshotter.accel import compiled
from snapshotter.errors import CorruptImage

_U16 = struct.Struct("<H")

SUPER_OFFSET = 1024
SUPER_MAGIC = 0xE0F5E1E2
SUPER_SIZE = 128
INODE_SLOT_SIZE = 32
NULL_ADDR = 0xFFFFFFFF  # a hole in a chunk index (the 32-bit form of EROFS_NULL_ADDR)
NAME_LEN_MAX = 255

FEATURE_INCOMPAT_CHUNKED_FILE = 0x00000004
FEATURE_INCOMPAT_DEVICE_TABLE = 0x00000008
# What our reader understands; an image with other incompat bits is refused.
READER_INCOMPAT = 0x00000001 | FEATURE_INCOMPAT_CHUNKED_FILE | FEATURE_INCOMPAT_DEVICE_TABLE
FEATURE_COMPAT_SB_CHKSUM = 0x00000001

LAYOUT_FLAT_PLAIN = 0
LAYOUT_COMPRESSED_FULL = 1
LAYOUT_FLAT_INLINE = 2
LAYOUT_COMPRESSED_COMPACT = 3
LAYOUT_CHUNK_BASED = 4

CHUNK_FORMAT_BLKBITS_MASK = 0x001F
CHUNK_FORMAT_INDEXES = 0x0020

FT_UNKNOWN, FT_REG_FILE, FT_DIR, FT_CHRDEV, FT_BLKDEV, FT_FIFO, FT_SOCK, FT_SYMLINK = range(8)

_FT_BY_FMT = {
    stat.S_IFREG: FT_REG_FILE,
    stat.S_IFDIR: FT_DIR,
    stat.S_IFCHR: FT_CHRDEV,
    stat.S_IFBLK: FT_BLKDEV,
    stat.S_IFIFO: FT_FIFO,
    stat.S_IFSOCK: FT_SOCK,
    stat.S_IFLNK: FT_SYMLINK,
}


def file_type(mode: int) -> int:
    """The dirent file type for an inode mode."""
    return _FT_BY_FMT.get(stat.S_IFMT(mode), FT_UNKNOWN)


def encode_dev(major: int, minor: int) -> int:
    """Linux `new_encode_dev`, the form EROFS stores device numbers in."""
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


def decode_dev(rdev: int) -> tuple[int, int]:
    """Linux `new_decode_dev`: (major, minor)."""
    major = (rdev & 0xFFF00) >> 8
    minor = (rdev & 0xFF) | ((rdev >> 12) & 0xFFF00)
    return major, minor


class FormatError(CorruptImage, ValueError):
    """Bytes that are not a valid EROFS structure, or values EROFS cannot store."""


@dataclass
class SuperBlock:
    """The 128-byte superblock at byte 1024 of the primary device."""

    blkszbits: int = 12
    root_nid: int = 0
    inos: int = 0
    build_time: int = 0
    build_time_nsec: int = 0
    blocks: int = 0
    meta_blkaddr: int = 0
    xattr_blkaddr: int = 0
    uuid: bytes = b"\0" * 16
    volume_name: bytes = b"\0" * 16
    feature_compat: int = 0
    feature_incompat: int = 0
    extra_devices: int = 0
    devt_slotoff: int = 0
    checksum: int = 0
    sb_extslots: int = 0
    dirblkbits: int = 0
    packed_nid: int = 0

    _STRUCT = struct.Struct("<IIIBBHQqIIII16s16sIHHHBB4xQ24x")

    @property
    def block_size(self) -> int:
        return 1 << self.blkszbits

    def pack(self) -> bytes:
        return self._STRUCT.pack(
            SUPER_MAGIC,
            self.checksum,
            self.feature_compat,
            self.blkszbits,
            self.sb_extslots,
            self.root_nid,
            self.inos,
            self.build_time,
            self.build_time_nsec,
            self.blocks,
            self.meta_blkaddr,
            self.xattr_blkaddr,
            self.uuid,
            self.volume_name,
            self.feature_incompat,
            0,
            self.extra_devices,
            self.devt_slotoff,
            self.dirblkbits,
            0,
            self.packed_nid,
        )

    @classmethod
    def unpack(cls, data: bytes) -> SuperBlock:
        if len(data) < SUPER_SIZE:
            raise FormatError("superblock truncated")
        (
            magic,
            checksum,
            compat,
            blkszbits,
            extslots,
            root_nid,
            inos,
            build_time,
            build_time_nsec,
            blocks,
            meta_blkaddr,
            xattr_blkaddr,
            uuid,
            volume_name,
            incompat,
            _u1,
            extra_devices,
            devt_slotoff,
            dirblkbits,
            _prefix_count,
            packed_nid,
        ) = cls._STRUCT.unpack_from(data)
        if magic != SUPER_MAGIC:
            raise FormatError(f"not an EROFS image (magic {magic:#x})")
        if not 9 <= blkszbits <= 16:
            raise FormatError(f"unsupported block size 2^{blkszbits}")
        return cls(
            blkszbits=blkszbits,
            root_nid=root_nid,
            inos=inos,
            build_time=build_time,
            build_time_nsec=build_time_nsec,
            blocks=blocks,
            meta_blkaddr=meta_blkaddr,
            xattr_blkaddr=xattr_blkaddr,
            uuid=uuid,
            volume_name=volume_name,
            feature_compat=compat,
            feature_incompat=incompat,
            extra_devices=extra_devices,
            devt_slotoff=devt_slotoff,
            checksum=checksum,
            sb_extslots=extslots,
            dirblkbits=dirblkbits,
            packed_nid=packed_nid,
        )


@dataclass
class DeviceSlot:
    """One 128-byte entry of the device table (extra devices of a multi-device image)."""

    tag: bytes = b""
    blocks: int = 0
    uniaddr: int = 0

    SIZE = 128
    _STRUCT = struct.Struct("<64sIIHH52x")

    def pack(self) -> bytes:
        if len(self.tag) > 64:
            raise FormatError("device tag longer than 64 bytes")
        return self._STRUCT.pack(
            self.tag,
            self.blocks & 0xFFFFFFFF,
            self.uniaddr & 0xFFFFFFFF,
            self.blocks >> 32,
            self.uniaddr >> 32,
        )

    @classmethod
    def unpack(cls, data: bytes) -> DeviceSlot:
        tag, blocks_lo, uniaddr_lo, blocks_hi, uniaddr_hi = cls._STRUCT.unpack_from(data)
        return cls(
            tag=tag.rstrip(b"\0"),
            blocks=blocks_lo | blocks_hi << 32,
            uniaddr=uniaddr_lo | uniaddr_hi << 32,
        )


@dataclass(slots=True)
class Inode:
    """An on-disk inode, compact (32 bytes) or extended (64 bytes).

    `i_u` is the layout-dependent word: start block for flat layouts, encoded rdev for device
    nodes, chunk format for chunk-based files. `extended` picks the form; `fits_compact` says
    whether the compact form can hold the values (the writer decides).
    """

    mode: int
    layout: int = LAYOUT_FLAT_PLAIN
    extended: bool = True
    xattr_icount: int = 0
    nlink: int = 1
    size: int = 0
    i_u: int = 0
    ino: int = 0
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    mtime_nsec: int = 0

    COMPACT_SIZE = 32
    EXTENDED_SIZE = 64
    _COMPACT = struct.Struct("<HHHHIIIIHHI")
    _EXTENDED = struct.Struct("<HHHHQIIIIqII16x")  # mtime: signed (time64_t)

    @property
    def isize(self) -> int:
        return self.EXTENDED_SIZE if self.extended else self.COMPACT_SIZE

    @property
    def xattr_isize(self) -> int:
        return 0 if self.xattr_icount == 0 else 12 + 4 * (self.xattr_icount - 1)

    @staticmethod
    def fits_compact(nlink: int, size: int, uid: int, gid: int) -> bool:
        return nlink <= 0xFFFF and size <= 0xFFFFFFFF and uid <= 0xFFFF and gid <= 0xFFFF

    def pack(self) -> bytes:
        fmt = (1 if self.extended else 0) | (self.layout << 1)
        if self.extended:
            return self._EXTENDED.pack(
                fmt,
                self.xattr_icount,
                self.mode,
                0,
                self.size,
                self.i_u,
                self.ino,
                self.uid,
                self.gid,
                self.mtime,
                self.mtime_nsec,
                self.nlink,
            )
        return self._COMPACT.pack(
            fmt,
            self.xattr_icount,
            self.mode,
            self.nlink,
            self.size,
            0,
            self.i_u,
            self.ino,
            self.uid,
            self.gid,
            0,
        )

    @classmethod
    def pack_into(
        cls,
        buf: bytearray,
        offset: int,
        extended: bool,
        layout: int,
        xattr_icount: int,
        mode: int,
        nlink: int,
        size: int,
        i_u: int,
        ino: int,
        uid: int,
        gid: int,
        mtime: int,
        mtime_nsec: int,
    ) -> None:
        """`pack` without an Inode object: the fields straight into `buf` at `offset` (the
        writer lays out hundreds of thousands of inodes; the bytes are `pack`'s)."""
        fmt = (1 if extended else 0) | (layout << 1)
        if extended:
            cls._EXTENDED.pack_into(
                buf, offset, fmt, xattr_icount, mode, 0, size, i_u, ino, uid, gid, mtime,
                mtime_nsec, nlink,
            )  # fmt: skip
        else:
            cls._COMPACT.pack_into(
                buf, offset, fmt, xattr_icount, mode, nlink, size, 0, i_u, ino, uid, gid, 0
            )

    @classmethod
    def unpack_fields(
        cls, data: bytes | mmap.mmap, offset: int
    ) -> tuple[int, int, int, int, int, int, int, int, int, int]:
        """`unpack` without an Inode object, for readers that visit every inode.

        Returns (fmt, xattr_icount, mode, nlink, size, i_u, uid, gid, mtime, mtime_nsec),
        `fmt` being the raw format word (bit 0: extended; bits 1-3: layout); a compact inode's
        mtime is given as (0, 0), the caller substitutes the superblock's build time. Raises
        FormatError for unknown format bits or a truncated inode (struct.error if `offset`
        leaves no room for even the compact form)."""
        (fmt,) = _U16.unpack_from(data, offset)
        if fmt & ~0xF:
            raise FormatError(f"unsupported inode format bits {fmt:#x}")
        if fmt & 1:
            if len(data) < offset + cls.EXTENDED_SIZE:
                raise FormatError("extended inode truncated")
            (_, icount, mode, _nb, size, i_u, _ino, uid, gid, mtime, nsec, nlink) = (
                cls._EXTENDED.unpack_from(data, offset)
            )
            return fmt, icount, mode, nlink, size, i_u, uid, gid, mtime, nsec
        (_, icount, mode, nlink, size, _mtime, i_u, _ino, uid, gid, _) = cls._COMPACT.unpack_from(
            data, offset
        )
        return fmt, icount, mode, nlink, size, i_u, uid, gid, 0, 0

    @classmethod
    def unpack(cls, data: bytes, build_time: int = 0, build_time_nsec: int = 0) -> Inode:
        """Parse an inode; compact inodes take their mtime from the superblock (as 6.1 does)."""
        (fmt,) = struct.unpack_from("<H", data)
        if fmt & ~0xF:
            raise FormatError(f"unsupported inode format bits {fmt:#x}")
        layout = (fmt >> 1) & 0x7
        if fmt & 1:
            if len(data) < cls.EXTENDED_SIZE:
                raise FormatError("extended inode truncated")
            (_, icount, mode, _nb, size, i_u, ino, uid, gid, mtime, nsec, nlink) = (
                cls._EXTENDED.unpack_from(data)
            )
            return cls(
                mode=mode,
                layout=layout,
                extended=True,
                xattr_icount=icount,
                nlink=nlink,
                size=size,
                i_u=i_u,
                ino=ino,
                uid=uid,
                gid=gid,
                mtime=mtime,
                mtime_nsec=nsec,
            )
        (_, icount, mode, nlink, size, _mtime, i_u, ino, uid, gid, _) = cls._COMPACT.unpack_from(
            data
        )
        return cls(
            mode=mode,
            layout=layout,
            extended=False,
            xattr_icount=icount,
            nlink=nlink,
            size=size,
            i_u=i_u,
            ino=ino,
            uid=uid,
            gid=gid,
            mtime=build_time,
            mtime_nsec=build_time_nsec,
        )


@dataclass(slots=True)
class Dirent:
    """A 12-byte directory entry; names follow the entry array inside each directory block."""

    nid: int
    nameoff: int
    file_type: int

    SIZE = 12
    _STRUCT = struct.Struct("<QHBx")

    def pack(self) -> bytes:
        return self._STRUCT.pack(self.nid, self.nameoff, self.file_type)

    @classmethod
    def unpack(cls, data: bytes | memoryview, offset: int = 0) -> Dirent:
        nid, nameoff, ftype = cls._STRUCT.unpack_from(data, offset)
        return cls(nid=nid, nameoff=nameoff, file_type=ftype)

    @classmethod
    def pack_block(cls, entries: Sequence[tuple[bytes, int, int]]) -> bytes:
        """One directory block: the (name, nid, file type) entries' dirents, then their
        names, as `pack` and the names joined would give (the caller sorts and sizes)."""
        count = len(entries)
        nameoff = cls.SIZE * count
        fields: list[int] = []
        for name, nid, ftype in entries:
            fields += (nid, nameoff, ftype)
            nameoff += len(name)
        head = struct.pack("<" + "QHBx" * count, *fields)
        return head + b"".join([e[0] for e in entries])

    @classmethod
    def unpack_block(cls, block: bytes | memoryview, count: int) -> Iterator[tuple[int, int, int]]:
        """(nid, nameoff, file type) of the first `count` dirents of a block (the caller
        checks `count * SIZE` lies inside it)."""
        return cls._STRUCT.iter_unpack(block[: count * cls.SIZE])


@dataclass(slots=True)
class ChunkIndex:
    """An 8-byte chunk index: which device and block a chunk of a chunk-based file lives at."""

    blkaddr: int
    device_id: int = 0

    SIZE = 8
    _STRUCT = struct.Struct("<HHI")

    def pack(self) -> bytes:
        return self._STRUCT.pack(0, self.device_id, self.blkaddr)

    @classmethod
    def pack_table(cls, blkaddrs: Sequence[int], devices: Sequence[int] | None) -> bytes:
        """Many indexes at once, as `pack` would write them one by one."""
        count = len(blkaddrs)
        if devices is None:
            devices = [0] * count
        fields: list[int] = [0] * (3 * count)
        fields[1::3] = devices
        fields[2::3] = blkaddrs
        return struct.pack(f"<{'HHI' * count}", *fields)

    @classmethod
    def unpack(cls, data: bytes | memoryview, offset: int = 0) -> ChunkIndex:
        _advise, device_id, blkaddr = cls._STRUCT.unpack_from(data, offset)
        return cls(blkaddr=blkaddr, device_id=device_id)


# xattr name prefixes EROFS can index (the rest of a name is stored after the index).
XATTR_INDEX_USER = 1
XATTR_INDEX_POSIX_ACL_ACCESS = 2
XATTR_INDEX_POSIX_ACL_DEFAULT = 3
XATTR_INDEX_TRUSTED = 4
XATTR_INDEX_SECURITY = 6

_XATTR_PREFIXES: tuple[tuple[int, bytes], ...] = (
    (XATTR_INDEX_POSIX_ACL_ACCESS, b"system.posix_acl_access"),
    (XATTR_INDEX_POSIX_ACL_DEFAULT, b"system.posix_acl_default"),
    (XATTR_INDEX_USER, b"user."),
    (XATTR_INDEX_TRUSTED, b"trusted."),
    (XATTR_INDEX_SECURITY, b"security."),
)
_PREFIX_BY_INDEX = dict(_XATTR_PREFIXES)


def split_xattr_name(name: bytes) -> tuple[int, bytes]:
    """(name index, suffix) for a full xattr name; FormatError if EROFS cannot store it."""
    for index, prefix in _XATTR_PREFIXES:
        if name.startswith(prefix):
            suffix = name[len(prefix) :]
            if index in (XATTR_INDEX_POSIX_ACL_ACCESS, XATTR_INDEX_POSIX_ACL_DEFAULT):
                if suffix:
                    continue
            elif not suffix:
                break
            return index, suffix
    raise FormatError(f"xattr name {name!r} has no EROFS name prefix")


@dataclass(frozen=True)
class XattrEntry:
    """One xattr entry (inline or shared): 4-byte header, name suffix, value, 4-byte aligned."""

    name: bytes  # the full name, e.g. b"trusted.overlay.opaque"
    value: bytes

    _HEAD = struct.Struct("<BBH")

    @property
    def size(self) -> int:
        _, suffix = split_xattr_name(self.name)
        return (4 + len(suffix) + len(self.value) + 3) & ~3

    def pack(self) -> bytes:
        index, suffix = split_xattr_name(self.name)
        if len(suffix) > 255 or len(self.value) > 0xFFFF:
            raise FormatError(f"xattr {self.name!r} too large for EROFS")
        raw = self._HEAD.pack(len(suffix), index, len(self.value)) + suffix + self.value
        return raw + b"\0" * (-len(raw) % 4)

    @classmethod
    def unpack(
        cls, data: bytes | memoryview | mmap.mmap, offset: int = 0
    ) -> tuple[XattrEntry, int]:
        """Parse one entry at `offset`; returns it and the offset after it."""
        name_len, index, value_size = cls._HEAD.unpack_from(data, offset)
        start = offset + 4
        suffix = bytes(data[start : start + name_len])
        value = bytes(data[start + name_len : start + name_len + value_size])
        if len(value) != value_size or index not in _PREFIX_BY_INDEX:
            raise FormatError(f"bad xattr entry at {offset}")
        end = offset + ((4 + name_len + value_size + 3) & ~3)
        return cls(name=_PREFIX_BY_INDEX[index] + suffix, value=value), end


@dataclass
class XattrIbody:
    """An inode's inline xattr area: 12-byte header, shared xattr ids, then inline entries."""

    shared_ids: list[int] = field(default_factory=list)
    entries: list[XattrEntry] = field(default_factory=list)

    _HEAD = struct.Struct("<IB7x")

    def pack(self) -> bytes:
        if len(self.shared_ids) > 255:
            raise FormatError("more than 255 shared xattrs on one inode")
        head = self._HEAD.pack(0, len(self.shared_ids))
        ids = struct.pack(f"<{len(self.shared_ids)}I", *self.shared_ids)
        return head + ids + b"".join(e.pack() for e in self.entries)

    @property
    def icount(self) -> int:
        """The inode's `i_xattr_icount` for this area (0 when there is nothing to store)."""
        if not self.shared_ids and not self.entries:
            return 0
        size = 12 + 4 * len(self.shared_ids) + sum(e.size for e in self.entries)
        return 1 + (size - 12) // 4

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> XattrIbody:
        (_, shared_count) = cls._HEAD.unpack_from(data)
        ids = list(struct.unpack_from(f"<{shared_count}I", data, 12))
        entries = []
        offset = 12 + 4 * shared_count
        while offset + 4 <= len(data):
            entry, offset = XattrEntry.unpack(data, offset)
            entries.append(entry)
        return cls(shared_ids=ids, entries=entries)


# -- the metadata writer's per-inode loops ---------------------------------------------------
#
# The writer (writer.py `write_metadata`) lays out and packs every inode and directory block
# of an image in these three loops; a merge runs them over hundreds of thousands of inodes.
# Each has a pure-Python body (the reference) and, optionally, the same loop compiled
# (snapshotter/fsmeta/_mergepack.c), which gives the same bytes and, for anything it does
# not expect (a value out of range, a missing key), leaves the work to the pure loop, so an
# error is the pure loop's. `EROFS_PASSTHROUGH_PURE=1` (read at import) forces the pure loops.


class _InodeAttrs(Protocol):
    mode: int
    uid: int
    gid: int
    mtime: int
    mtime_nsec: int


def layout_inode_table_pure(
    heads: list[int],
    tables: list[bytes | None] | None,
    tails: dict[int, bytes],
    meta_start: int,
    base: int,
    bs: int,
) -> tuple[list[int], int]:
    """Each inode's nid and the end of the inode table: inodes 32-byte aligned, one's header
    of `heads[i]` bytes followed by its chunk table (8-aligned) and inline tail, which must
    not cross a block boundary (the inode moves to the next block then). `tables` None: no
    inode has a chunk table."""
    nids = [0] * len(heads)
    pos = meta_start
    for i in range(len(heads)):
        pos = (pos + 31) & ~31
        size = heads[i]
        if tables is not None:
            table = tables[i]
            if table is not None:
                size = ((size + 7) & ~7) + len(table)
        tail = tails.get(i)
        if tail:
            tail_start = pos + size
            if tail_start // bs != (tail_start + len(tail) - 1) // bs:
                pos = -(-pos // bs) * bs
            size += len(tail)
        nids[i] = (pos - base) // INODE_SLOT_SIZE
        pos += size
    return nids, pos


def layout_inode_table_filling_gaps(
    heads: list[int],
    tables: list[bytes | None] | None,
    tails: dict[int, bytes],
    meta_start: int,
    base: int,
    bs: int,
) -> tuple[list[int], int]:
    """`layout_inode_table_pure`, but an inode whose tail would cross a block boundary
    leaves a gap that a later inode fitting in it takes (the smallest gap that fits; ties:
    the lowest address), as mkfs.erofs fills partly used blocks: with tail packing, inodes of
    up to a block each would otherwise leave a third of the metadata empty. Pure Python only:
    tail packing is off for the service's layers and merges, where the table is large."""
    nids = [0] * len(heads)
    pos = meta_start
    gaps: list[tuple[int, int]] = []  # (free bytes, 32-aligned start), sorted; within a block
    for i in range(len(heads)):
        pos = (pos + 31) & ~31
        size = heads[i]
        if tables is not None:
            table = tables[i]
            if table is not None:
                size = ((size + 7) & ~7) + len(table)
        tail = tails.get(i)
        if tail:
            size += len(tail)
        if gaps:
            k = bisect_left(gaps, (size,))
            if k < len(gaps):
                free, start = gaps.pop(k)
                nids[i] = (start - base) // INODE_SLOT_SIZE
                rest = (start + size + 31) & ~31
                if start + free - rest >= 32:
                    insort(gaps, (start + free - rest, rest))
                continue
        if tail:
            tail_start = pos + size - len(tail)
            if tail_start // bs != (tail_start + len(tail) - 1) // bs:
                end = -(-pos // bs) * bs
                if end - pos >= 32:
                    insort(gaps, (end - pos, pos))
                pos = end
        nids[i] = (pos - base) // INODE_SLOT_SIZE
        pos += size
    return nids, pos


def pack_inode_table_pure(
    meta: bytearray,
    order: Sequence[_InodeAttrs],
    nids: list[int],
    heads: list[int],
    layouts: bytearray,
    links: list[int],
    sizes: list[int],
    i_us: list[int],
    xbodies: dict[int, bytes],
    tables: list[bytes | None] | None,
    tails: dict[int, bytes],
    offset: int,
) -> None:
    """Every inode into `meta` (the inode table; `offset`: the byte of nid 0 minus the table's
    first byte), as `Inode.pack` gives it, then its xattr body, chunk table and tail."""
    pack_inode = Inode.pack_into
    for i, node in enumerate(order):
        off = offset + nids[i] * INODE_SLOT_SIZE
        head = heads[i]
        xbody = xbodies.get(i) if xbodies else None
        xsize = 0 if xbody is None else len(xbody)  # == the inode's xattr_isize
        pack_inode(
            meta,
            off,
            head - xsize == 64,
            layouts[i],
            0 if xbody is None else 1 + (xsize - 12) // 4,
            node.mode,
            links[i],
            sizes[i],
            i_us[i],
            i + 1,
            node.uid,
            node.gid,
            node.mtime,
            node.mtime_nsec,
        )
        off += head
        if xbody is not None:
            meta[off - xsize : off] = xbody
        if tables is not None:
            table = tables[i]
            if table is not None:
                off = (off + 7) & ~7
                meta[off : off + len(table)] = table
                off += len(table)
        tail = tails.get(i)
        if tail:
            meta[off : off + len(tail)] = tail


class _DirNode(Protocol):
    mode: int


def pack_dir_blocks_pure(
    groups: list[list[bytes]],
    children: Mapping[bytes, _DirNode],
    nid_of: Mapping[int, int],
    own_nid: int,
    parent_nid: int,
) -> list[bytes]:
    """A directory's blocks (`Dirent.pack_block` of each group of names, sorted and sized
    by the caller), each child's nid found by `id` of its node."""
    dir_type = file_type(stat.S_IFDIR)
    blocks = []
    for names in groups:
        entries = []
        for name in names:
            if name == b".":
                entries.append((name, own_nid, dir_type))
            elif name == b"..":
                entries.append((name, parent_nid, dir_type))
            else:
                child = children[name]
                entries.append((name, nid_of[id(child)], file_type(child.mode)))
        blocks.append(Dirent.pack_block(entries))
    return blocks


_LOOPS: Any = compiled("snapshotter.fsmeta._mergepack", "common_mtime")  # (accel.py)
#: True when the compiled loops are in use (not forced off, built and importable)
LOOPS_ACCELERATED = _LOOPS is not None
#: the writer's compiled tree walk (writer.py `_walk_tree`), or None: the pure walk
WALK_TREE: Callable[[Any], tuple[list[Any], list[int], list[int]] | None] | None = (
    None if _LOOPS is None else _LOOPS.walk_tree
)
#: the writer's compiled directory block plan (writer.py `_dir_block_plan`), or None
DIR_BLOCK_PLAN: Callable[[dict[bytes, Any], int], tuple[list[list[bytes]], int] | None] | None = (
    None if _LOOPS is None else _LOOPS.dir_block_plan
)
#: the writer's compiled column loop for a merge's common file (`write_metadata`), or None
FILE_COLUMNS: Callable[..., tuple[list[int], int] | None] | None = (
    None if _LOOPS is None else _LOOPS.file_columns
)
#: the compiled count of the tree's most common mtime (`pick_build_time`'s pick), or None
COMMON_MTIME: Callable[[list[Any]], tuple[int, int] | None] | None = (
    None if _LOOPS is None else _LOOPS.common_mtime
)


def layout_inode_table(
    heads: list[int],
    tables: list[bytes | None] | None,
    tails: dict[int, bytes],
    meta_start: int,
    base: int,
    bs: int,
) -> tuple[list[int], int]:
    """`layout_inode_table_pure`, compiled where it can be."""
    if _LOOPS is not None:
        got = _LOOPS.layout_inode_table(heads, tables, tails, meta_start, base, bs)
        if got is not None:
            return got
    return layout_inode_table_pure(heads, tables, tails, meta_start, base, bs)


def pack_inode_table(
    meta: bytearray,
    order: Sequence[_InodeAttrs],
    nids: list[int],
    heads: list[int],
    layouts: bytearray,
    links: list[int],
    sizes: list[int],
    i_us: list[int],
    xbodies: dict[int, bytes],
    tables: list[bytes | None] | None,
    tails: dict[int, bytes],
    offset: int,
) -> None:
    """`pack_inode_table_pure`, compiled where it can be."""
    args = (meta, order, nids, heads, layouts, links, sizes, i_us, xbodies, tables, tails)
    if _LOOPS is None or not _LOOPS.pack_inode_table(*args, offset):
        pack_inode_table_pure(*args, offset)


def pack_dir_blocks(
    groups: list[list[bytes]],
    children: Mapping[bytes, _DirNode],
    nid_of: Mapping[int, int],
    own_nid: int,
    parent_nid: int,
) -> list[bytes]:
    """`pack_dir_blocks_pure`, compiled where it can be."""
    if _LOOPS is not None:
        got = _LOOPS.pack_dir_blocks(groups, children, nid_of, own_nid, parent_nid)
        if got is not None:
            return got
    return pack_dir_blocks_pure(groups, children, nid_of, own_nid, parent_nid)
