"""A whole-image check of an untrusted EROFS layer (a registry's native layer) before we accept it.

What a careful `fsck.erofs` checks, and what the kernel refuses at mount or lookup time, so that
nothing we store can later crash the merge, alias entries in an fsmeta or make a guest kernel
read the wrong blocks:

- superblock: magic, block size the kernel mounts (512..4096), no directory block bits, the
  crc32c checksum when `EROFS_FEATURE_COMPAT_SB_CHKSUM` is set (computed as the kernel's
  `erofs_superblock_csum_verify` does), a single device, a block count the blob holds;
- every inode reachable from the root: a file type Linux knows, a data layout we can address,
  every data block range, chunk table and inline tail inside the image (`ErofsImage.data_map`
  checks ranges), symlink targets of 1..4095 bytes, xattrs that parse and stay in the image;
- every directory: blocks as `fsck.erofs` checks them (`ErofsImage.listdir`), names strictly
  sorted (the kernel's lookup is a binary search), exactly one `.` (itself) and one `..` (its
  parent), file types that match the inodes, and no directory reached twice (no cycles, no
  hardlinked directories).

The work is bounded by the blob's size, not by any size the image declares: every chunk table
and directory must lie inside the image before it is read, and the directories, chunk tables
and xattr areas of distinct inodes may together not take more bytes than the image has (in a
real image they never overlap).
"""

from __future__ import annotations

import stat
from collections import deque
from dataclasses import dataclass

import google_crc32c

from snapshotter.erofs.format import (
    CHUNK_FORMAT_INDEXES,
    FEATURE_COMPAT_SB_CHKSUM,
    FT_DIR,
    FT_UNKNOWN,
    LAYOUT_CHUNK_BASED,
    SUPER_OFFSET,
    ChunkIndex,
    file_type,
)
from snapshotter.erofs.reader import ErofsImage, InodeInfo
from snapshotter.errors import CorruptImage, EpError

BLKSZBITS_MIN, BLKSZBITS_MAX = 9, 12  # the kernel mounts block sizes up to PAGE_SIZE
_SB_CHECKSUM_FIELD = slice(4, 8)  # `checksum` in struct erofs_super_block


class InvalidLayer(CorruptImage):
    """An EROFS layer that is damaged or that a kernel, fsck.erofs or our merge would refuse."""


@dataclass(frozen=True)
class LayerCheck:
    """What the check saw: inodes reached and directory entries (without `.` and `..`)."""

    inodes: int
    entries: int


def _checksummed_end(blkszbits: int) -> int:
    """End of the bytes the superblock checksum covers: from byte 1024 to the end of the
    superblock's block, or one whole block's length for blocks of 1024 bytes and less."""
    length = 1 << blkszbits
    if length > SUPER_OFFSET:
        length -= SUPER_OFFSET
    return SUPER_OFFSET + length


def superblock_checksum(image_head: bytes, blkszbits: int) -> int:
    """The superblock checksum as the kernel's `erofs_superblock_csum_verify` computes it:
    Linux's `crc32c(~0, ...)`, which is not inverted at the end (so the bitwise NOT of the
    standard CRC-32C), over the checksummed bytes with the checksum field zeroed."""
    area = bytearray(image_head[SUPER_OFFSET : _checksummed_end(blkszbits)])
    if len(area) != _checksummed_end(blkszbits) - SUPER_OFFSET:
        raise InvalidLayer("superblock block truncated")
    area[_SB_CHECKSUM_FIELD] = bytes(4)
    return google_crc32c.value(bytes(area)) ^ 0xFFFFFFFF


def _show(path: bytes) -> str:
    text = path.decode("utf-8", "backslashreplace") or "/"
    return text if len(text) <= 200 else text[:200] + "..."


class _Checker:
    def __init__(self, img: ErofsImage, label: str) -> None:
        self.img = img
        self.label = label
        self.bs = img.block_size
        self.image_bytes = img.sb.blocks * self.bs
        self.budget = self.image_bytes  # bytes of per-inode structures still allowed
        self.inodes: dict[int, InodeInfo] = {}
        self.entries = 0

    def fail(self, path: bytes, nid: int, why: str) -> InvalidLayer:
        return InvalidLayer(f"{self.label}: {_show(path)} (nid {nid}): {why}")

    def failed_read(self, path: bytes, nid: int, exc: EpError) -> InvalidLayer:
        """A reader error, which names the image and nid itself, as one line of ours."""
        why = str(exc)
        for prefix in (f"{self.img.name}: ", f"nid {nid}: "):
            why = why.removeprefix(prefix)
        return self.fail(path, nid, why)

    def charge(self, path: bytes, nid: int, nbytes: int) -> None:
        self.budget -= nbytes
        if self.budget < 0:
            raise self.fail(
                path,
                nid,
                "directories, chunk tables and xattrs together take "
                "more bytes than the image has (they overlap)",
            )

    def inode(self, path: bytes, nid: int) -> InodeInfo:
        """Read and check an inode once, however many entries name it."""
        info = self.inodes.get(nid)
        if info is not None:
            return info
        try:
            info = self.img.inode(nid)
        except EpError as exc:
            raise self.failed_read(path, nid, exc) from exc
        self.check_inode(path, info)
        self.inodes[nid] = info
        return info

    def check_inode(self, path: bytes, info: InodeInfo) -> None:
        mode, nid, inode = info.mode, info.nid, info.inode
        if file_type(mode) == FT_UNKNOWN:
            raise self.fail(path, nid, f"bogus file mode {mode:#o}")
        try:
            self.charge(path, nid, inode.xattr_isize)
            self.img.xattrs(info)
            if stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode):
                refs = self.img.data_map(info)  # a chunk table lies inside the image
                if inode.layout == LAYOUT_CHUNK_BASED:
                    unit = ChunkIndex.SIZE if inode.i_u & CHUNK_FORMAT_INDEXES else 4
                    self.charge(path, nid, unit * len(refs))
            if stat.S_ISLNK(mode):
                self.img.readlink(info)
            if stat.S_ISDIR(mode):
                if inode.size == 0:
                    raise self.fail(path, nid, "empty directory (no '.' and '..')")
                self.charge(path, nid, inode.size)
        except InvalidLayer:
            raise
        except EpError as exc:
            raise self.failed_read(path, nid, exc) from exc

    def check_directory(
        self,
        path: bytes,
        info: InodeInfo,
        parent_nid: int,
        queue: deque[tuple[bytes, int, int]],
        dirs_seen: set[int],
    ) -> None:
        try:
            listing = self.img.listdir(info)
        except EpError as exc:
            raise self.failed_read(path, info.nid, exc) from exc
        previous: bytes | None = None
        dots = {b".": 0, b"..": 0}
        for name, nid, ftype in listing:
            if previous is not None and name <= previous:
                raise self.fail(
                    path, info.nid, f"entries not sorted: {name[:64]!r} after {previous[:64]!r}"
                )
            previous = name
            if name in dots:
                dots[name] += 1
                want = info.nid if name == b"." else parent_nid
                if nid != want or ftype != FT_DIR:
                    raise self.fail(
                        path,
                        info.nid,
                        f"'{name.decode()}' entry points at nid {nid}, not at nid {want}",
                    )
                continue
            child_path = path + b"/" + name
            child = self.inode(child_path, nid)
            if ftype != file_type(child.mode):
                raise self.fail(
                    child_path,
                    nid,
                    f"entry file type {ftype} does not match the inode's mode {child.mode:#o}",
                )
            self.entries += 1
            if stat.S_ISDIR(child.mode):
                if nid in dirs_seen:
                    raise self.fail(
                        child_path,
                        nid,
                        "directory reached twice (a cycle or a hardlinked directory)",
                    )
                dirs_seen.add(nid)
                queue.append((child_path, nid, info.nid))
        for name, count in dots.items():
            if count != 1:
                raise self.fail(path, info.nid, f"{count} '{name.decode()}' entries")

    def run(self) -> LayerCheck:
        root_nid = self.img.root_nid
        root = self.inode(b"", root_nid)
        if not stat.S_ISDIR(root.mode):
            raise self.fail(b"", root_nid, "the root is not a directory")
        queue: deque[tuple[bytes, int, int]] = deque([(b"", root_nid, root_nid)])
        dirs_seen = {root_nid}
        while queue:
            path, nid, parent = queue.popleft()
            self.check_directory(path, self.inodes[nid], parent, queue, dirs_seen)
        return LayerCheck(inodes=len(self.inodes), entries=self.entries)


def check_superblock(img: ErofsImage, blob_size: int, label: str) -> None:
    """What the kernel checks when it mounts, and what a layer must be for our merge."""
    sb = img.sb
    if not BLKSZBITS_MIN <= sb.blkszbits <= BLKSZBITS_MAX:
        raise InvalidLayer(
            f"{label}: block size 2^{sb.blkszbits}: the kernel mounts 512 to 4096 bytes"
        )
    if sb.dirblkbits:
        raise InvalidLayer(f"{label}: directory block bits {sb.dirblkbits} are not supported")
    if SUPER_OFFSET + 128 + 16 * sb.sb_extslots > 4096:
        raise InvalidLayer(f"{label}: superblock extension slots {sb.sb_extslots} too large")
    if sb.blocks == 0 or sb.blocks * img.block_size > blob_size:
        raise InvalidLayer(
            f"{label}: EROFS image claims {sb.blocks * img.block_size} bytes, blob has {blob_size}"
        )
    if sb.feature_compat & FEATURE_COMPAT_SB_CHKSUM:
        want = superblock_checksum(img.read_at(0, _checksummed_end(sb.blkszbits)), sb.blkszbits)
        if want != sb.checksum:
            raise InvalidLayer(
                f"{label}: superblock checksum {sb.checksum:#010x}, the "
                f"superblock's crc32c is {want:#010x}"
            )
    if img.device_slots:
        raise InvalidLayer(f"{label}: a multi-device EROFS image is not a layer")
    if sb.meta_blkaddr >= sb.blocks:
        raise InvalidLayer(f"{label}: metadata block {sb.meta_blkaddr} beyond the image")


def validate_layer(img: ErofsImage, blob_size: int, label: str | None = None) -> LayerCheck:
    """Check the whole image `img` (a blob of `blob_size` bytes); InvalidLayer naming the
    inode and path of the first problem found."""
    label = label or img.name
    check_superblock(img, blob_size, label)
    return _Checker(img, label).run()
