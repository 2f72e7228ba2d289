"""The in-memory inode tree an image is written from.

Sources (a tar stream, a directory, the layers of a merge) build a tree of `Node`s whose file
data is already placed (`Extent`, `Chunks`, `PackedChunks`, `InlineTail`); the writer then lays
out metadata around it. Names are bytes: EROFS stores them as bytes and tar names need not be UTF-8.
"""

from __future__ import annotations

import stat
from array import array
from collections import Counter
from dataclasses import dataclass, field

from snapshotter.errors import InvalidInput


@dataclass(frozen=True, slots=True)
class Extent:
    """File data stored contiguously: `nblocks` blocks from `start` on device `device`."""

    start: int
    nblocks: int
    device: int = 0


@dataclass(frozen=True)
class Chunks:
    """File data as chunks of `block_size << chunkbits` bytes, each at its own address.

    `blkaddrs[i]` is the start block of chunk i (NULL_ADDR for a hole that reads as zeros);
    `devices[i]` the device it lives on (0 = primary), or None when all are on the primary.
    """

    chunkbits: int
    blkaddrs: array
    devices: array | None = None


@dataclass(frozen=True, slots=True)
class PackedChunks:
    """Chunk-based file data whose chunk indexes are already packed, 8 bytes each as the image
    stores them (`ChunkIndex`): what the merge copies from a layer or a parent fsmeta. One
    small bytes object per file instead of two arrays: a 500k-file merge holds them all."""

    chunkbits: int
    table: bytes


@dataclass(frozen=True)
class InlineTail:
    """File data whose whole blocks are an `Extent` and whose last partial block is stored
    inline after the inode (EROFS "tail packing"). `tail` holds those bytes."""

    head: Extent | None
    tail: bytes


FileData = Extent | Chunks | PackedChunks | InlineTail | None


@dataclass(eq=False, slots=True)
class Node:
    """One inode. Directories hold `children`; a hardlinked inode is one Node in several dirs."""

    mode: int
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    mtime_nsec: int = 0
    size: int = 0
    data: FileData = None
    rdev: tuple[int, int] = (0, 0)
    symlink: bytes | None = None
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    children: dict[bytes, Node] | None = None

    @classmethod
    def directory(
        cls, mode: int = 0o755, *, uid: int = 0, gid: int = 0, mtime: int = 0, mtime_nsec: int = 0
    ) -> Node:
        return cls(
            mode=stat.S_IFDIR | (mode & 0o7777),
            uid=uid,
            gid=gid,
            mtime=mtime,
            mtime_nsec=mtime_nsec,
            children={},
        )

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    def dir_children(self) -> dict[bytes, Node]:
        """`children` of a node known to be a directory (`Node.directory` made it).

        For callers that walk directories only: a node without children here is a bug in
        the tree's builder, not bad input, hence TypeError rather than an EpError."""
        children = self.children
        if children is None:
            raise TypeError(f"inode of mode {self.mode:o} is not a directory node")
        return children


def validate_name(name: bytes) -> None:
    """A directory entry name EROFS and Linux accept: not empty, no '/', no NUL, <= 255."""
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise InvalidInput(f"invalid file name {name!r}")
    if len(name) > 255:
        raise InvalidInput(f"file name longer than 255 bytes: {name[:40]!r}...")


@dataclass
class SourceTree:
    """A source read into a tree: the root, the image build time chosen, entries read."""

    root: Node
    build_time: int
    build_time_nsec: int
    entries: int


def pick_build_time(mtimes: Counter[tuple[int, int]]) -> tuple[int, int]:
    """The most common (seconds, nanoseconds) mtime, the latest on a tie.

    Compact inodes (32 bytes instead of 64) can only carry the superblock's build time, so
    the most common mtime makes the most inodes compact; it also dates implicit directories.
    """
    if not mtimes:
        return 0, 0
    return max(mtimes.items(), key=lambda kv: (kv[1], kv[0]))[0]
