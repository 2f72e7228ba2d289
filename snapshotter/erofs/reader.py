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
from typing import ParamSpec, TypeVar

from snapshotter.errors import EpError

from .format import (
    CHUNK_FORMAT_BLKBITS_MASK,
    CHUNK_FORMAT_INDEXES,
    INODE_SLOT_SIZE,
    LAYOUT_CHUNK_BASED,
    LAYOUT_FLAT_INLINE,
    LAYOUT_FLAT_PLAIN,
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


_CORRUPTION = (struct.error, IndexError, ValueError, OverflowError, KeyError)


def _corrupt_is_an_error(method: Callable[P, R]) -> Callable[P, R]:
    """Untrusted images (a registry's EROFS layer, a merge input) must fail with EpError, never
    with whatever a malformed structure happens to raise deep inside."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(*args, **kwargs)
        except _CORRUPTION as exc:
            image = args[0]
            raise EpError(f"{image.path}: corrupt EROFS image ({exc})") from None

    return wrapper


class ErofsImage:
    """A read-only view of an EROFS image file. `devices` are the extra devices' paths."""

    def __init__(self, path: str | os.PathLike[str] | int,
                 devices: list[Path] | None = None) -> None:
        """`path`: the image file, or an open file descriptor of it (left open)."""
        if isinstance(path, int):
            self.path = Path(f"/proc/self/fd/{path}")
            self._map = self._map_fd(path)
        else:
            self.path = Path(path)
            with open(self.path, "rb") as f:
                self._map = self._map_fd(f.fileno())
        try:
            self.sb = SuperBlock.unpack(self._map[SUPER_OFFSET:SUPER_OFFSET + 128])
        except FormatError as exc:
            self._map.close()
            raise EpError(f"{self.path}: {exc}") from None
        unknown = self.sb.feature_incompat & ~READER_INCOMPAT
        if unknown:
            raise EpError(f"{self.path}: unsupported EROFS features {unknown:#x}")
        self.block_size = self.sb.block_size
        self.device_slots = self._read_device_table()
        self._device_paths = devices or []
        self._device_maps: dict[int, mmap.mmap] = {}

    def _map_fd(self, fd: int) -> mmap.mmap:
        if os.fstat(fd).st_size < SUPER_OFFSET + 128:
            raise EpError(f"{self.path}: too small to be an EROFS image")
        return mmap.mmap(fd, 0, access=mmap.ACCESS_READ)

    def close(self) -> None:
        for m in self._device_maps.values():
            m.close()
        self._map.close()

    def __enter__(self) -> ErofsImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- structures -------------------------------------------------------------------------

    @_corrupt_is_an_error
    def _read_device_table(self) -> list[DeviceSlot]:
        start = self.sb.devt_slotoff * DeviceSlot.SIZE
        return [
            DeviceSlot.unpack(self._map[start + i * DeviceSlot.SIZE:
                                        start + (i + 1) * DeviceSlot.SIZE])
            for i in range(self.sb.extra_devices)
        ]

    def read_at(self, pos: int, length: int) -> bytes:
        """Raw bytes of the primary device."""
        return self._bytes(pos, length)

    def _bytes(self, pos: int, length: int) -> bytes:
        if pos < 0 or pos + length > len(self._map):
            raise EpError(f"{self.path}: read beyond the image at {pos}+{length}")
        return self._map[pos:pos + length]

    @property
    def root_nid(self) -> int:
        return self.sb.root_nid

    @_corrupt_is_an_error
    def inode(self, nid: int) -> InodeInfo:
        pos = self.sb.meta_blkaddr * self.block_size + nid * INODE_SLOT_SIZE
        try:
            inode = Inode.unpack(self._bytes(pos, Inode.EXTENDED_SIZE if self._is_extended(pos)
                                             else Inode.COMPACT_SIZE),
                                 self.sb.build_time, self.sb.build_time_nsec)
        except FormatError as exc:
            raise EpError(f"{self.path}: nid {nid}: {exc}") from None
        return InodeInfo(nid=nid, inode=inode, pos=pos)

    def _is_extended(self, pos: int) -> bool:
        return bool(self._bytes(pos, 2)[0] & 1)

    @_corrupt_is_an_error
    def xattrs(self, info: InodeInfo) -> dict[bytes, bytes]:
        if not info.inode.xattr_icount:
            return {}
        raw = self._bytes(info.pos + info.inode.isize, info.inode.xattr_isize)
        body = XattrIbody.unpack(raw)
        out: dict[bytes, bytes] = {}
        for xid in body.shared_ids:
            entry, _ = XattrEntry.unpack(
                self._map, self.sb.xattr_blkaddr * self.block_size + xid * 4)
            out[entry.name] = entry.value
        for entry in body.entries:
            out[entry.name] = entry.value
        return out

    def rdev(self, info: InodeInfo) -> tuple[int, int]:
        return decode_dev(info.inode.i_u)

    # -- data -------------------------------------------------------------------------------

    @_corrupt_is_an_error
    def data_map(self, info: InodeInfo) -> list[ChunkRef]:
        """Where the inode's data lives, in file order."""
        inode, bs = info.inode, self.block_size
        size = inode.size
        if size == 0:
            return []
        if inode.layout == LAYOUT_FLAT_PLAIN:
            return [ChunkRef(0, size, 0, inode.i_u)]
        if inode.layout == LAYOUT_FLAT_INLINE:
            tail_len = size % bs or bs
            head = size - tail_len
            refs = [ChunkRef(0, head, 0, inode.i_u)] if head else []
            tail_pos = info.data_pos
            if tail_pos % bs + tail_len > bs:
                raise EpError(f"{self.path}: nid {info.nid}: inline data crosses a block")
            refs.append(ChunkRef(head, tail_len, 0, None, inline_pos=tail_pos))
            return refs
        if inode.layout == LAYOUT_CHUNK_BASED:
            return self._chunk_map(info)
        raise EpError(f"{self.path}: nid {info.nid}: compressed data (layout {inode.layout}) "
                      "is not supported")

    def _chunk_map(self, info: InodeInfo) -> list[ChunkRef]:
        inode, bs = info.inode, self.block_size
        fmt = inode.i_u & 0xFFFF
        chunk_size = bs << (fmt & CHUNK_FORMAT_BLKBITS_MASK)
        count = -(-inode.size // chunk_size)
        unit = ChunkIndex.SIZE if fmt & CHUNK_FORMAT_INDEXES else 4
        if info.data_pos + count * unit > len(self._map):
            raise EpError(f"{self.path}: nid {info.nid}: chunk table beyond the image")
        refs = []
        if fmt & CHUNK_FORMAT_INDEXES:
            base = (info.data_pos + 7) & ~7
            for i in range(count):
                idx = ChunkIndex.unpack(self._map, base + i * ChunkIndex.SIZE)
                refs.append(self._chunk_ref(i, chunk_size, inode.size, idx.device_id,
                                            idx.blkaddr))
        else:
            base = (info.data_pos + 3) & ~3
            for i in range(count):
                addr = int.from_bytes(self._bytes(base + 4 * i, 4), "little")
                refs.append(self._chunk_ref(i, chunk_size, inode.size, 0, addr))
        return refs

    @staticmethod
    def _chunk_ref(i: int, chunk_size: int, size: int, device: int, addr: int) -> ChunkRef:
        offset = i * chunk_size
        length = min(chunk_size, size - offset)
        return ChunkRef(offset, length, device, None if addr == NULL_ADDR else addr)

    def _device_map(self, device: int) -> mmap.mmap:
        if device == 0:
            return self._map
        if device not in self._device_maps:
            if device > len(self._device_paths):
                raise EpError(f"{self.path}: data on device {device}, which was not given")
            with open(self._device_paths[device - 1], "rb") as f:
                self._device_maps[device] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._device_maps[device]

    def iter_data(self, info: InodeInfo) -> Iterator[bytes]:
        """The inode's data in pieces (regular files, directories, symlinks)."""
        for ref in self.data_map(info):
            if ref.inline_pos is not None:
                yield self._bytes(ref.inline_pos, ref.length)
            elif ref.blkaddr is None:
                yield bytes(ref.length)
            else:
                m = self._device_map(ref.device)
                start = ref.blkaddr * self.block_size
                if start + ref.length > len(m):
                    raise EpError(f"{self.path}: nid {info.nid}: data beyond device "
                                  f"{ref.device}")
                yield m[start:start + ref.length]

    @_corrupt_is_an_error
    def read(self, info: InodeInfo) -> bytes:
        return b"".join(self.iter_data(info))

    def readlink(self, info: InodeInfo) -> bytes:
        if not stat.S_ISLNK(info.mode):
            raise EpError(f"nid {info.nid} is not a symlink")
        return self.read(info)

    # -- directories ------------------------------------------------------------------------

    @_corrupt_is_an_error
    def listdir(self, info: InodeInfo) -> list[tuple[bytes, int, int]]:
        """(name, nid, file type) of every entry, `.` and `..` included, in on-disk order."""
        if not stat.S_ISDIR(info.mode):
            raise EpError(f"nid {info.nid} is not a directory")
        if info.size > len(self._map):
            raise EpError(f"{self.path}: nid {info.nid}: directory larger than the image")
        data = self.read(info)
        bs = self.block_size
        out = []
        for blk in range(0, len(data), bs):
            block = data[blk:blk + bs]
            first = Dirent.unpack(block, 0)
            count = first.nameoff // Dirent.SIZE
            if count == 0 or first.nameoff > len(block):
                raise EpError(f"{self.path}: nid {info.nid}: corrupt directory block")
            ents = [Dirent.unpack(block, i * Dirent.SIZE) for i in range(count)]
            for i, ent in enumerate(ents):
                end = ents[i + 1].nameoff if i + 1 < count else len(block)
                name = block[ent.nameoff:end]
                if i + 1 == count:
                    name = name.split(b"\0", 1)[0]
                out.append((name, ent.nid, ent.file_type))
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
                raise EpError(f"{path!r}: no such entry")
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
                    raise EpError(f"{self.path}: directory nid {nid} appears twice (a cycle)")
                seen_dirs.add(nid)
                children = [(n, c) for n, c, _ in self.listdir(info) if n not in (b".", b"..")]
                for name, child in reversed(children):
                    stack.append((path + b"/" + name if path else name, child))
