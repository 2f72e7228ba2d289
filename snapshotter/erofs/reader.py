"""Reading uncompressed EROFS images: ours and those `mkfs.erofs` writes.

Used by `inspect`, the fsmeta merge and the tests. Every structure is parsed by the same class
in `format` that the writer packs it with. Compressed files are recognised and refused.
"""

from __future__ import annotations

import functools
import mmap
import os
import stat
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

from snapshotter.erofs.format import (
    CHUNK_FORMAT_BLKBITS_MASK,
    CHUNK_FORMAT_INDEXES,
    INODE_SLOT_SIZE,
    LAYOUT_CHUNK_BASED,
    LAYOUT_COMPRESSED_COMPACT,
    LAYOUT_COMPRESSED_FULL,
    LAYOUT_FLAT_INLINE,
    LAYOUT_FLAT_PLAIN,
    NAME_LEN_MAX,
    NULL_ADDR,
    READER_INCOMPAT,
    SUPER_OFFSET,
    ChunkIndex,
    DeviceSlot,
    Dirent,
    FormatError,
    Inode,
    SuperBlock,
    XattrEntry,
    XattrIbody,
    decode_dev,
)
from snapshotter.errors import EpError, InvalidArgument, NotFound

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class ChunkRef:
    """Where one piece of a file's data lives: `length` bytes at block `blkaddr` of device
    `device` (0 = primary); a hole (`blkaddr is None`) reads as zeros; an inline tail sits at
    byte `inline_pos` of the primary device's metadata."""

    offset: int
    length: int
    device: int
    blkaddr: int | None
    inline_pos: int | None = None


@dataclass(slots=True)
class InodeInfo:
    nid: int
    inode: Inode
    pos: int  # byte offset of the inode in the primary device

    @property
    def mode(self) -> int:
        return self.inode.mode

    @property
    def size(self) -> int:
        return self.inode.size

    @property
    def data_pos(self) -> int:
        """Byte offset just after the inode and its inline xattrs."""
        return self.pos + self.inode.isize + self.inode.xattr_isize


#: `inode_fields`' tuple: (pos, fmt, xattr_icount, mode, nlink, size, i_u, uid, gid, mtime,
#: mtime_nsec)
InodeFields = tuple[int, int, int, int, int, int, int, int, int, int, int]


def fields_isize(fmt: int) -> int:
    """The inode's own bytes from its format word (`InodeFields[1]`): extended or compact."""
    return 64 if fmt & 1 else 32


def fields_data_pos(fields: InodeFields) -> int:
    """Byte offset just after the inode and its inline xattrs (`InodeInfo.data_pos`) from
    its `inode_fields`: where inline data, or a chunk table, starts."""
    pos, fmt, icount = fields[:3]
    return pos + fields_isize(fmt) + (12 + 4 * (icount - 1) if icount else 0)


#: the merge's compiled scan, `scan_dir(image, data, block_size, meta_base, build_time,
#: build_time_nsec)` (fsmeta/_mergescan.c, its first argument bound)
ScanDir = Callable[
    [mmap.mmap | bytes, bytes, int, int, int, int], "list[tuple[bytes, int, Any]] | None"
]

_HOLE_PIECE = 1 << 20
#: images of at most this many bytes are read whole instead of mapped (`ErofsImage._map_fd`)
READ_WHOLE_MAX = 64 << 10
SYMLINK_MAX = 4095  # PATH_MAX - 1: the kernel refuses longer inline targets, Linux any longer

_CORRUPTION = (struct.error, IndexError, ValueError, OverflowError, KeyError)


def _corrupt_is_an_error(
    method: Callable[Concatenate[ErofsImage, P], R],
) -> Callable[Concatenate[ErofsImage, P], R]:
    """Untrusted images (a registry's EROFS layer, a merge input) must fail with EpError, never
    with whatever a malformed structure happens to raise deep inside."""

    @functools.wraps(method)
    def wrapper(image: ErofsImage, /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(image, *args, **kwargs)
        except FormatError:
            raise  # already says what is wrong, and where
        except _CORRUPTION as exc:
            raise FormatError(f"{image.name}: corrupt EROFS image ({exc})") from None

    return wrapper


class ErofsImage:
    """A read-only view of an EROFS image file. `devices` are the extra devices' paths."""

    def __init__(
        self,
        path: str | os.PathLike[str] | int,
        devices: list[Path] | None = None,
        *,
        name: str | None = None,
    ) -> None:
        """`path`: the image file, or an open file descriptor of it (left open). `name`: what
        error messages call the image (default: its path). `file_size`: the file's bytes when
        opened (an image's file may carry more after the image, e.g. a dm-verity tree)."""
        self.file_size = 0
        if isinstance(path, int):
            self.path = Path(f"/proc/self/fd/{path}")
            self.name = name or str(self.path)
            self._map = self._map_fd(path)
        else:
            self.path = path if isinstance(path, Path) else Path(path)
            self.name = name or str(self.path)
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                self._map = self._map_fd(fd)
            finally:
                os.close(fd)
        try:
            self.sb = SuperBlock.unpack(self._map[SUPER_OFFSET : SUPER_OFFSET + 128])
        except FormatError as exc:
            self._close_map()
            raise FormatError(f"{self.name}: {exc}") from None
        unknown = self.sb.feature_incompat & ~READER_INCOMPAT
        if unknown:
            self._close_map()
            raise FormatError(f"{self.name}: unsupported EROFS features {unknown:#x}")
        self.block_size = self.sb.block_size
        try:
            self.device_slots = self._read_device_table() if self.sb.extra_devices else []
        except EpError:
            self._close_map()
            raise
        self._meta_base = self.sb.meta_blkaddr * self.block_size
        self._device_paths = devices or []
        self._device_maps: dict[int, mmap.mmap] = {}
        self._shared_xattrs: dict[int, XattrEntry] = {}

    def _map_fd(self, fd: int) -> mmap.mmap | bytes:
        """The image's bytes: a small image (a merge's typical upper layer, a few blocks) is
        read whole with one pread, which costs a fraction of setting up and tearing down a
        mapping; a larger one is mapped, so only what is read is paged in."""
        size = self.file_size = os.fstat(fd).st_size
        if size < SUPER_OFFSET + 128:
            raise FormatError(f"{self.name}: too small to be an EROFS image")
        if size <= READ_WHOLE_MAX:
            raw = os.pread(fd, size, 0)
            if len(raw) == size:
                return raw
        return mmap.mmap(fd, 0, access=mmap.ACCESS_READ)

    def _close_map(self) -> None:
        if isinstance(self._map, mmap.mmap):
            self._map.close()

    def close(self) -> None:
        for m in self._device_maps.values():
            m.close()
        self._close_map()

    def __enter__(self) -> ErofsImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- structures -------------------------------------------------------------------------

    @_corrupt_is_an_error
    def _read_device_table(self) -> list[DeviceSlot]:
        start = self.sb.devt_slotoff * DeviceSlot.SIZE
        return [
            DeviceSlot.unpack(
                self._map[start + i * DeviceSlot.SIZE : start + (i + 1) * DeviceSlot.SIZE]
            )
            for i in range(self.sb.extra_devices)
        ]

    def read_at(self, pos: int, length: int) -> bytes:
        """Raw bytes of the primary device."""
        return self._bytes(pos, length)

    def _bytes(self, pos: int, length: int) -> bytes:
        if pos < 0 or pos + length > len(self._map):
            raise FormatError(f"{self.name}: read beyond the image at {pos}+{length}")
        return self._map[pos : pos + length]

    @property
    def root_nid(self) -> int:
        return self.sb.root_nid

    def inode_fields(self, nid: int) -> InodeFields:
        """The inode `nid` as a tuple, for readers that visit every inode (the merge):
        (pos, fmt, xattr_icount, mode, nlink, size, i_u, uid, gid, mtime, mtime_nsec), `pos`
        its byte offset, `fmt` its format word (bit 0: extended; bits 1-3: the layout); a
        compact inode's mtime is the superblock's build time. The same checks as `inode`,
        without an object or a wrapper frame per call."""
        pos = self._meta_base + nid * INODE_SLOT_SIZE
        try:
            fields = Inode.unpack_fields(self._map, pos)
        except FormatError as exc:
            raise FormatError(f"{self.name}: nid {nid}: {exc}") from None
        except _CORRUPTION as exc:
            raise FormatError(f"{self.name}: corrupt EROFS image ({exc})") from None
        fmt, icount, mode, nlink, size, i_u, uid, gid, mtime, nsec = fields
        if not fmt & 1:
            mtime, nsec = self.sb.build_time, self.sb.build_time_nsec
        return pos, fmt, icount, mode, nlink, size, i_u, uid, gid, mtime, nsec

    @_corrupt_is_an_error
    def inode(self, nid: int) -> InodeInfo:
        pos = self._meta_base + nid * INODE_SLOT_SIZE
        try:
            inode = Inode.unpack(
                self._bytes(
                    pos, Inode.EXTENDED_SIZE if self._is_extended(pos) else Inode.COMPACT_SIZE
                ),
                self.sb.build_time,
                self.sb.build_time_nsec,
            )
        except FormatError as exc:
            raise FormatError(f"{self.name}: nid {nid}: {exc}") from None
        return InodeInfo(nid=nid, inode=inode, pos=pos)

    def _is_extended(self, pos: int) -> bool:
        return bool(self._bytes(pos, 2)[0] & 1)

    def xattrs(self, info: InodeInfo) -> dict[bytes, bytes]:
        ino = info.inode
        if not ino.xattr_icount:  # most inodes: no call through the checking wrapper
            return {}
        return self.xattrs_at(info.nid, info.pos + ino.isize, ino.xattr_icount)

    @_corrupt_is_an_error
    def xattrs_at(self, nid: int, start: int, icount: int) -> dict[bytes, bytes]:
        """The xattrs of inode `nid` whose inline xattr area (`icount` as the inode says)
        starts at byte `start` (after the inode)."""
        if not icount:
            return {}
        xattr_isize = 12 + 4 * (icount - 1)
        if start + xattr_isize > self.sb.blocks * self.block_size:
            raise FormatError(
                f"{self.name}: nid {nid}: xattrs of {xattr_isize} bytes beyond the image"
            )
        raw = self._bytes(start, xattr_isize)
        body = XattrIbody.unpack(raw)
        out: dict[bytes, bytes] = {}
        for xid in body.shared_ids:
            entry = self._shared_xattr(xid)
            out[entry.name] = entry.value
        for entry in body.entries:
            out[entry.name] = entry.value
        return out

    def _shared_xattr(self, xid: int) -> XattrEntry:
        """A shared xattr, parsed once however many inodes refer to it."""
        entry = self._shared_xattrs.get(xid)
        if entry is None:
            pos = self.sb.xattr_blkaddr * self.block_size + xid * 4
            if pos + 4 > self.sb.blocks * self.block_size:
                raise FormatError(f"{self.name}: shared xattr {xid} beyond the image")
            entry, end = XattrEntry.unpack(self._map, pos)
            if end > self.sb.blocks * self.block_size:
                raise FormatError(f"{self.name}: shared xattr {xid} beyond the image")
            self._shared_xattrs[xid] = entry
        return entry

    def rdev(self, info: InodeInfo) -> tuple[int, int]:
        return decode_dev(info.inode.i_u)

    # -- data -------------------------------------------------------------------------------

    def _device_blocks(self, device: int) -> int:
        """How many blocks device `device` has (0 = the primary, whose superblock says)."""
        if device == 0:
            return self.sb.blocks
        if device > len(self.device_slots):
            raise FormatError(
                f"{self.name}: data on device {device}, but the image has "
                f"{len(self.device_slots)} extra devices"
            )
        return self.device_slots[device - 1].blocks

    def _check_blocks(self, info: InodeInfo, device: int, blkaddr: int, length: int) -> None:
        self.check_blocks(info.nid, device, blkaddr, length)

    def check_blocks(self, nid: int, device: int, blkaddr: int, length: int) -> None:
        """`length` bytes from block `blkaddr` of `device` must lie inside that device."""
        nblocks = -(-length // self.block_size)
        limit = self.sb.blocks if device == 0 else self._device_blocks(device)
        if blkaddr + nblocks > limit:
            where = f"device {device}" if device else "the image"
            raise FormatError(
                f"{self.name}: nid {nid}: data blocks {blkaddr}+{nblocks} "
                f"beyond {where} ({limit} blocks)"
            )

    @_corrupt_is_an_error
    def data_map(self, info: InodeInfo) -> list[ChunkRef]:
        """Where the inode's data lives, in file order; every range checked to lie inside its
        device, so a caller can trust the addresses (and the size is bounded by the image)."""
        inode, bs = info.inode, self.block_size
        size = inode.size
        if size == 0:
            return []
        if size >= 1 << 63:
            raise FormatError(f"{self.name}: nid {info.nid}: negative file size")
        if inode.layout == LAYOUT_FLAT_PLAIN:
            self._check_blocks(info, 0, inode.i_u, size)
            return [ChunkRef(0, size, 0, inode.i_u)]
        if inode.layout == LAYOUT_FLAT_INLINE:
            tail_len = size % bs or bs
            head = size - tail_len
            refs = []
            if head:
                self._check_blocks(info, 0, inode.i_u, head)
                refs.append(ChunkRef(0, head, 0, inode.i_u))
            tail_pos = info.data_pos
            if tail_pos % bs + tail_len > bs:
                raise FormatError(f"{self.name}: nid {info.nid}: inline data crosses a block")
            if tail_pos + tail_len > self.sb.blocks * bs:
                raise FormatError(f"{self.name}: nid {info.nid}: inline data beyond the image")
            refs.append(ChunkRef(head, tail_len, 0, None, inline_pos=tail_pos))
            return refs
        if inode.layout == LAYOUT_CHUNK_BASED:
            return self._chunk_map(info)
        if inode.layout in (LAYOUT_COMPRESSED_FULL, LAYOUT_COMPRESSED_COMPACT):
            raise FormatError(
                f"{self.name}: nid {info.nid}: compressed data (layout "
                f"{inode.layout}) is not supported"
            )
        raise FormatError(f"{self.name}: nid {info.nid}: unknown data layout {inode.layout}")

    def _chunk_map(self, info: InodeInfo) -> list[ChunkRef]:
        inode, bs = info.inode, self.block_size
        fmt = inode.i_u & 0xFFFF
        if fmt & ~(CHUNK_FORMAT_BLKBITS_MASK | CHUNK_FORMAT_INDEXES):
            raise FormatError(f"{self.name}: nid {info.nid}: unknown chunk format {fmt:#x}")
        chunk_size = bs << (fmt & CHUNK_FORMAT_BLKBITS_MASK)
        count = -(-inode.size // chunk_size)
        # The table's size follows from the file size: it must be in the image before a
        # single index is read, so a huge size cannot make us loop or allocate.
        unit = ChunkIndex.SIZE if fmt & CHUNK_FORMAT_INDEXES else 4
        base = (info.data_pos + unit - 1) & ~(unit - 1)
        if base + count * unit > self.sb.blocks * bs:
            raise FormatError(
                f"{self.name}: nid {info.nid}: chunk table of {count} entries "
                f"(for {inode.size} bytes) beyond the image"
            )
        refs = []
        if fmt & CHUNK_FORMAT_INDEXES:
            table = struct.iter_unpack("<HHI", self._map[base : base + count * unit])
            for i, (_advise, device, addr) in enumerate(table):
                refs.append(self._chunk_ref(info, i, chunk_size, device, addr))
        else:
            table = struct.iter_unpack("<I", self._map[base : base + count * unit])
            for i, (addr,) in enumerate(table):
                refs.append(self._chunk_ref(info, i, chunk_size, 0, addr))
        return refs

    def _chunk_ref(
        self, info: InodeInfo, i: int, chunk_size: int, device: int, addr: int
    ) -> ChunkRef:
        offset = i * chunk_size
        length = min(chunk_size, info.inode.size - offset)
        if addr == NULL_ADDR:
            return ChunkRef(offset, length, device, None)
        self._check_blocks(info, device, addr, length)
        return ChunkRef(offset, length, device, addr)

    def _device_map(self, device: int) -> mmap.mmap | bytes:
        if device == 0:
            return self._map
        if device not in self._device_maps:
            if device > len(self._device_paths):
                raise FormatError(f"{self.name}: data on device {device}, which was not given")
            with open(self._device_paths[device - 1], "rb") as f:
                self._device_maps[device] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._device_maps[device]

    def iter_data(self, info: InodeInfo) -> Iterator[bytes]:
        """The inode's data in pieces (regular files, directories, symlinks)."""
        for ref in self.data_map(info):
            if ref.inline_pos is not None:
                yield self._bytes(ref.inline_pos, ref.length)
            elif ref.blkaddr is None:  # a hole, in pieces: a chunk can be terabytes
                for start in range(0, ref.length, _HOLE_PIECE):
                    yield bytes(min(_HOLE_PIECE, ref.length - start))
            else:
                m = self._device_map(ref.device)
                start = ref.blkaddr * self.block_size
                if start + ref.length > len(m):
                    raise FormatError(
                        f"{self.name}: nid {info.nid}: data beyond device {ref.device}"
                    )
                yield m[start : start + ref.length]

    @_corrupt_is_an_error
    def read(self, info: InodeInfo) -> bytes:
        return b"".join(self.iter_data(info))

    def readlink(self, info: InodeInfo) -> bytes:
        if not stat.S_ISLNK(info.mode):
            raise InvalidArgument(f"nid {info.nid} is not a symlink")
        if not 0 < info.size <= SYMLINK_MAX:
            raise FormatError(f"{self.name}: nid {info.nid}: symlink target of {info.size} bytes")
        return self.read(info)

    # -- directories ------------------------------------------------------------------------

    @_corrupt_is_an_error
    def _dir_data(self, info: InodeInfo) -> bytes:
        """A directory's bytes, its size bounded by the image first."""
        if not stat.S_ISDIR(info.mode):
            raise InvalidArgument(f"nid {info.nid} is not a directory")
        inode, bs = info.inode, self.block_size
        size, limit = inode.size, self.sb.blocks * bs
        if size > limit:  # holes could make it any size
            raise FormatError(f"{self.name}: nid {info.nid}: directory larger than the image")
        if inode.layout == LAYOUT_FLAT_INLINE and 0 < size <= bs:
            # The common small directory, wholly inline after its inode: `data_map`'s
            # checks without its ChunkRef and the join (a merge reads every directory).
            pos = info.data_pos
            if pos % bs + size > bs:
                raise FormatError(f"{self.name}: nid {info.nid}: inline data crosses a block")
            if pos + size > limit:
                raise FormatError(f"{self.name}: nid {info.nid}: inline data beyond the image")
            return self._bytes(pos, size)
        return self.read(info)

    def entries_fields(
        self, info: InodeInfo, scan: ScanDir | None = None
    ) -> list[tuple[bytes, int, InodeFields]]:
        """(name, nid, `inode_fields(nid)`) of every entry but `.` and `..`, in on-disk
        order: what the merge reads of each directory. The names are checked as `listdir`
        checks them, every entry's inode read (an error in any of them is raised before
        the caller sees an entry). `scan`: the merge's compiled loop doing the same in one
        call (fsmeta/_mergescan.c); where it finds anything amiss it returns None and this
        path runs instead, so the error is the one `listdir` or `inode_fields` gives. (The
        scan may give, for an entry, what its caller makes of the inode instead of its
        fields: the merge's node of a common file.)"""
        if scan is not None:
            data = self._dir_data(info)
            sb = self.sb
            got = scan(
                self._map, data, self.block_size, self._meta_base, sb.build_time,
                sb.build_time_nsec,
            )  # fmt: skip
            if got is not None:
                return got
        fields = self.inode_fields
        return [
            (name, nid, fields(nid))
            for name, nid, _ftype in self.listdir(info)
            if name != b"." and name != b".."
        ]

    def dir_entries_fields(
        self, nid: int, fields: InodeFields, scan: ScanDir | None = None
    ) -> list[tuple[bytes, int, InodeFields]]:
        """`entries_fields` of directory `nid` whose `inode_fields` the caller holds (the
        merge has them from the parent's entries): the common small directory, wholly
        inline after its inode, goes to `scan` with `_dir_data`'s checks and no `InodeInfo`;
        anything else, or a scan that finds anything amiss, takes `entries_fields`."""
        fmt, mode, size = fields[1], fields[3], fields[5]
        bs = self.block_size
        if scan is not None and stat.S_ISDIR(mode) and (fmt >> 1) & 7 == LAYOUT_FLAT_INLINE:
            data_pos = fields_data_pos(fields)
            end = data_pos + size
            sb = self.sb
            inline = size > 0 and data_pos % bs + size <= bs  # within its block
            if inline and end <= len(self._map) and end <= sb.blocks * bs:
                got = scan(
                    self._map, self._map[data_pos:end], bs, self._meta_base,
                    sb.build_time, sb.build_time_nsec,
                )  # fmt: skip
                if got is not None:
                    return got
        return self.entries_fields(self.inode(nid), scan)

    @_corrupt_is_an_error
    def listdir(self, info: InodeInfo) -> list[tuple[bytes, int, int]]:
        """(name, nid, file type) of every entry, `.` and `..` included, in on-disk order.

        Each block is checked as `fsck.erofs` and the kernel's readdir check it: the first
        name offset inside the block and after whole dirents, every name right after the
        previous one, 1..255 bytes, within the block; and no name holds a '/' or a NUL (the
        kernel would hand either to user space as a name)."""
        data = self._dir_data(info)
        bs = self.block_size
        out = []
        for blk in range(0, len(data), bs):
            block = data[blk : blk + bs]
            first_nameoff = int.from_bytes(block[8:10], "little") if len(block) >= 12 else 0
            if first_nameoff < Dirent.SIZE or first_nameoff >= bs or first_nameoff > len(block):
                raise FormatError(
                    f"{self.name}: nid {info.nid}: directory block {blk // bs}: "
                    f"first name offset {first_nameoff} is invalid"
                )
            count = first_nameoff // Dirent.SIZE
            ents = list(Dirent.unpack_block(block, count))
            next_nameoff = first_nameoff
            last = count - 1
            for i, (nid, nameoff, ftype) in enumerate(ents):
                if nameoff != next_nameoff:
                    raise FormatError(
                        f"{self.name}: nid {info.nid}: directory block {blk // bs}: "
                        f"entry {i} has a bogus name offset"
                    )
                if i < last:
                    name = block[nameoff : ents[i + 1][1]]
                else:
                    name = block[nameoff:].split(b"\0", 1)[0]
                if not name or len(name) > NAME_LEN_MAX:
                    raise FormatError(
                        f"{self.name}: nid {info.nid}: directory block {blk // bs}: "
                        f"entry {i} has a name of bogus length"
                    )
                if b"/" in name or b"\0" in name:
                    raise FormatError(f"{self.name}: nid {info.nid}: invalid file name {name!r}")
                next_nameoff += len(name)
                out.append((name, nid, ftype))
        return out

    def lookup(self, path: str | bytes) -> InodeInfo:
        """The inode at a slash-separated path from the root."""
        if isinstance(path, str):
            path = os.fsencode(path)
        info = self.inode(self.root_nid)
        for part in (p for p in path.split(b"/") if p):
            for name, nid, _ in self.listdir(info):
                if name == part:
                    info = self.inode(nid)
                    break
            else:
                raise NotFound(f"{path!r}: no such entry")
        return info

    def walk(self) -> Iterator[tuple[bytes, InodeInfo]]:
        """Every path (root as b"") and its inode, parents before children."""
        stack: list[tuple[bytes, int]] = [(b"", self.root_nid)]
        seen_dirs: set[int] = set()
        while stack:
            path, nid = stack.pop()
            info = self.inode(nid)
            yield path, info
            if stat.S_ISDIR(info.mode):
                if nid in seen_dirs:
                    raise FormatError(f"{self.name}: directory nid {nid} appears twice (a cycle)")
                seen_dirs.add(nid)
                children = [(n, c) for n, c, _ in self.listdir(info) if n not in (b".", b"..")]
                for name, child in reversed(children):
                    stack.append((path + b"/" + name if path else name, child))
