"""Writing an uncompressed EROFS image.

The image is written in one forward pass, so a layer of any size streams through:

    [superblock (+ device table)] [file data ...] [directory blocks] [shared xattrs] [inodes]

File data goes out as it arrives (`DataWriter`), block-aligned, with all-zero chunks left out
(they become holes in a chunk-based inode); files of at most 512 bytes are kept to be written
inline after their inodes. Once every file is placed, `write_metadata` lays
out directories, shared xattrs and inodes after the data, and writes the superblock last. The
head (superblock block) is the only region written out of order.

Layout rules the kernel enforces, and how we meet them:
- a directory's entries are sorted by name across all of its blocks (binary search);
- inline (tail-packed) data must sit in the same block as the end of its inode's xattrs;
- chunk indexes start 8-byte aligned after the inode and its xattrs;
- nid 0 would be inode number 0, which readdir(3) skips: the metadata base is placed one
  block before the first inode, so nids start at `block_size / 32`.
"""

from __future__ import annotations

import os
import stat
import sys
from array import array
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from snapshotter.erofs.format import (
    CHUNK_FORMAT_INDEXES,
    FEATURE_INCOMPAT_CHUNKED_FILE,
    FEATURE_INCOMPAT_DEVICE_TABLE,
    INODE_SLOT_SIZE,
    LAYOUT_CHUNK_BASED,
    LAYOUT_FLAT_INLINE,
    NULL_ADDR,
    SUPER_OFFSET,
    SUPER_SIZE,
    ChunkIndex,
    DeviceSlot,
    Dirent,
    Inode,
    SuperBlock,
    XattrEntry,
    XattrIbody,
    encode_dev,
    file_type,
)
from snapshotter.erofs.limits import DEFAULT_LIMITS, Limits
from snapshotter.erofs.tree import Chunks, Extent, FileData, InlineTail, Node
from snapshotter.errors import InvalidArgument, InvalidInput

# Called with (byte offset, bytes) for every region written, in the order written.
WriteObserver = Callable[[int, bytes], None]

DEFAULT_HOLE_CHUNK = 64 * 1024
DEFAULT_INLINE_MAX = 512  # files up to this size are stored inline after their inode
INLINE_BUDGET = 64 << 20  # at most this much file data held for inlining
READ_SIZE = 1 << 20
WRITE_BUFFER = 4 << 20
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
ZEROS = bytes(READ_SIZE)
# Chunk indexes hold 32-bit block addresses, EROFS_NULL_ADDR (all ones) meaning a hole.
MAX_BLOCKS = NULL_ADDR
# Linux 6.1 computes a chunk index's position as `unsigned int` 8 * chunk number: keep every
# table well below 2^29 entries.
MAX_CHUNK_INDEXES = 1 << 28
# Largest chunk the format can say: chunkbits is block bits + a 5-bit field.
MAX_CHUNK_EXTRA_BITS = 31
# What choosing a chunk size weighs: a chunk index costs about this many bytes of memory and
# image (array, packed table, metadata buffer), a data chunk its size in written bytes.
CHUNK_INDEX_COST = 32


def header_blocks(block_size: int, extra_devices: int = 0) -> int:
    """Blocks taken by the boot area, the superblock and the device table."""
    end = SUPER_OFFSET + SUPER_SIZE + extra_devices * DeviceSlot.SIZE
    return -(-end // block_size)


class DataWriter:
    """Streams file data into the image, block by block, from block `start_block` on."""

    def __init__(
        self,
        fd: int,
        block_size: int,
        start_block: int,
        observer: WriteObserver | None = None,
        hole_chunk: int = DEFAULT_HOLE_CHUNK,
        inline_max: int = DEFAULT_INLINE_MAX,
        limits: Limits | None = None,
    ) -> None:
        """`limits`: the layer's ceilings (image bytes, sparse overhead); None for sources
        that are not untrusted layers (a directory commit, a merge): only the format's
        32-bit block addresses bound them."""
        if hole_chunk % block_size or hole_chunk & (hole_chunk - 1):
            raise InvalidArgument(
                "hole chunk size must be a power-of-two multiple of the block size"
            )
        self.fd = fd
        # Past this block the image is too large: for the limits, or for 32-bit addresses.
        image_bytes = limits.max_image_bytes if limits else MAX_BLOCKS * block_size
        self.max_blocks = min(image_bytes // block_size, MAX_BLOCKS)
        # What holes of sparse files may still cost.
        self.sparse_budget = (limits or DEFAULT_LIMITS).max_sparse_overhead_bytes
        self.block_size = block_size
        self.next_block = start_block
        self.observer = observer
        self.hole_chunk = hole_chunk
        self.inline_max = inline_max
        self._inline_budget = INLINE_BUDGET
        self._zero_chunk = bytes(hole_chunk)
        self._zero_view = memoryview(self._zero_chunk)
        self._pieces: list[bytes | memoryview] = []  # written at the next flush, in order
        self._pending = 0  # bytes in _pieces (whole blocks)
        os.lseek(fd, start_block * block_size, os.SEEK_SET)

    def _emit(self, data: bytes | memoryview) -> int:
        """Append whole-block data at the cursor; returns its first block.

        Pieces are gathered, not copied, and go out in one `writev` per WRITE_BUFFER bytes:
        a layer of many small files costs few write calls and no copy in user space. The
        observer sees the same bytes, in order, when they are flushed."""
        first = self.next_block
        self._pieces.append(data)
        self._pending += len(data)
        self.next_block += len(data) // self.block_size
        if self._pending >= WRITE_BUFFER:
            self.flush()
        return first

    def _emit_padded(self, pieces: Sequence[bytes | memoryview], size: int) -> int:
        """Append `size` bytes (in `pieces`) zero-padded to whole blocks; the first block."""
        first = self.next_block
        self._pieces.extend(pieces)
        rem = size % self.block_size
        if rem:
            self._pieces.append(self._zero_view[: self.block_size - rem])
            size += self.block_size - rem
        self._pending += size
        self.next_block += size // self.block_size
        if self._pending >= WRITE_BUFFER:
            self.flush()
        return first

    def _check_size(self) -> None:
        if self.next_block > self.max_blocks:
            raise InvalidInput(
                f"the image would exceed {self.max_blocks * self.block_size} bytes "
                "(max_image_bytes, or EROFS's 32-bit block addresses)"
            )

    def flush(self) -> None:
        if not self._pieces:
            return
        self._check_size()
        offset = self.next_block * self.block_size - self._pending
        pieces = self._pieces
        _write_all(self.fd, pieces)
        if self.observer is not None:
            self.observer(offset, b"".join(pieces))
        self._pieces = []
        self._pending = 0

    def _pad(self, data: bytes) -> bytes:
        rem = len(data) % self.block_size
        return data + bytes(self.block_size - rem) if rem else data

    def add_blocks(self, data: bytes) -> Extent:
        """Write raw data (zero-padded to whole blocks) contiguously."""
        first = self._emit_padded([data], len(data))
        return Extent(first, -(-len(data) // self.block_size))

    def add_file(self, read: Callable[[int], bytes | memoryview], size: int) -> FileData:
        """Copy `size` bytes from `read` into the image.

        `read(n)` may return fewer than n bytes (pieces are written as they come, without
        being joined); an empty read before `size` bytes is an EpError (a truncated source).
        All-zero aligned chunks of `hole_chunk` bytes are not written; if any were found the
        file becomes chunk-based with holes, else one contiguous extent.
        """
        if size == 0:
            return None
        if size <= self.inline_max and self._inline_budget >= size:
            # Tiny files live inline after their inode: a 4 KiB block each would be ~90% of
            # a rootfs layer's size in some directories. The budget bounds the memory held.
            self._inline_budget -= size
            return InlineTail(None, bytes(_read_exact(read, size)))
        chunk = self.hole_chunk
        if size < chunk:  # too small to hold a hole: the common case, kept short
            pieces = []
            got = 0
            while got < size:
                piece = read(size - got)
                if not piece:
                    raise InvalidInput(f"unexpected end of data: wanted {size} bytes, got {got}")
                pieces.append(piece)
                got += len(piece)
            first = self._emit_padded(pieces, size)
            return Extent(first, -(-size // self.block_size))
        return self._add_large(read, size)

    def _add_large(self, read: Callable[[int], bytes | memoryview], size: int) -> FileData:
        """A file that may hold holes: whole `hole_chunk` chunks of zeros are left out.

        Chunks are judged at their offsets in the file whatever the pieces `read` returns;
        only a chunk split between two pieces is copied (into `carry`) to be judged whole."""
        chunk = self.hole_chunk
        zero = self._zero_chunk
        addrs = array("I")
        start = self.next_block
        run: list[memoryview] = []  # non-zero chunks not emitted yet, contiguous
        run_bytes = 0
        carry = bytearray()
        got = 0

        def judge(view: memoryview) -> None:
            """Whole chunks (the last one of the file may be short)."""
            nonlocal run_bytes
            for pos in range(0, len(view), chunk):
                piece = view[pos : pos + chunk]
                # memoryview == bytes compares item by item (~12 ms per zero MiB): a look at
                # both ends, then a copy and memcmp for what may be a hole.
                if (
                    len(piece) == chunk
                    and not piece[0]
                    and not piece[-1]
                    and piece.tobytes() == zero
                ):
                    if run:
                        self._emit_padded(run, run_bytes)
                        run.clear()
                        run_bytes = 0
                    addrs.append(NULL_ADDR)
                else:
                    addrs.append(self.next_block + run_bytes // self.block_size)
                    run.append(piece)
                    run_bytes += len(piece)
                    if len(piece) != chunk:
                        # the file's last, partial chunk: padded when the run is emitted
                        break
            if run_bytes >= READ_SIZE:
                self._emit_padded(run, run_bytes)
                run.clear()
                run_bytes = 0

        while got < size:
            data = read(min(READ_SIZE, size - got))
            if not data:
                raise InvalidInput(f"unexpected end of data: wanted {size} bytes, got {got}")
            got += len(data)
            view = memoryview(data)
            if carry:
                take = chunk - len(carry)
                carry += view[:take]
                view = view[take:]
                if len(carry) == chunk or got == size:
                    judge(memoryview(bytes(carry)))
                    carry = bytearray()
            whole = len(view) if got == size else len(view) - len(view) % chunk
            if whole:
                judge(view[:whole])
            if whole < len(view):
                carry = bytearray(view[whole:])
        if run:
            self._emit_padded(run, run_bytes)
        assert len(addrs) == -(-size // chunk) and not carry
        if NULL_ADDR not in addrs:
            return Extent(start, self.next_block - start)
        return Chunks((chunk // self.block_size).bit_length() - 1, addrs)

    def add_sparse(
        self,
        runs: list[tuple[int, int]],
        size: int,
        read: Callable[[int], bytes | memoryview],
        max_indexes: int = MAX_CHUNK_INDEXES,
    ) -> FileData:
        """A sparse file: `runs` (sorted (offset, length) pairs) hold its data, the rest are
        holes; `read` gives the runs' bytes back to back.

        Holes are never read nor written: the file becomes chunk-based with null chunk
        indexes, at the chunk size that makes indexes plus written data chunks cheapest
        (a chunk holding any data is stored whole). `max_indexes` bounds its chunk table.
        The cost is bounded by the data and the limits, never by the declared size."""
        if size <= self.inline_max or size < self.hole_chunk:
            return self.add_file(_Expand(runs, size, read).read, size)
        stored = sum(length for _, length in runs)
        bits, cost = self._chunk_bits(runs, size, stored, min(max_indexes, MAX_CHUNK_INDEXES))
        self.sparse_budget -= cost
        chunk = 1 << bits
        nchunks = -(-size >> bits)
        addrs = array("I", [NULL_ADDR]) * nchunks
        expand = _Expand(runs, size, read)
        start_block = self.next_block
        for index in _touched_chunks(runs, bits):
            addrs[index] = self.next_block
            start = index << bits
            end = min(start + chunk, size)
            expand.seek(start)
            remaining = end - start
            while remaining:
                piece = expand.read(min(READ_SIZE, remaining))
                remaining -= len(piece)
                if remaining:
                    self._emit(piece)
                else:
                    self._emit_padded([piece], len(piece))
        if NULL_ADDR not in addrs:  # no hole after all: one contiguous extent
            return Extent(start_block, self.next_block - start_block)
        chunkbits = bits - (self.block_size.bit_length() - 1)
        return Chunks(chunkbits, addrs)

    def _chunk_bits(
        self, runs: list[tuple[int, int]], size: int, stored: int, max_indexes: int
    ) -> tuple[int, int]:
        """log2 of the chunk size for a sparse file, the cheapest that fits the limits, and
        its overhead: chunk indexes plus the zeros stored in data chunks."""
        block_bits = self.block_size.bit_length() - 1
        room = (self.max_blocks - self.next_block) * self.block_size
        best: tuple[int, int] | None = None
        for bits in range(self.hole_chunk.bit_length() - 1, block_bits + MAX_CHUNK_EXTRA_BITS + 1):
            data_bytes = _count_touched(runs, bits) << bits
            if best is not None and data_bytes - stored >= best[0]:
                break  # data only grows with the chunk size, indexes only shrink
            nchunks = -(-size >> bits)
            cost = nchunks * CHUNK_INDEX_COST + max(data_bytes - stored, 0)
            if (
                nchunks <= max_indexes
                and data_bytes <= room
                and cost <= self.sparse_budget
                and (best is None or cost < best[0])
            ):
                best = (cost, bits)
            if nchunks == 1:
                break
        if best is None:
            raise InvalidInput(
                f"a sparse file of {size} bytes with {len(runs)} data runs would "
                f"cost more than the limits allow (max_sparse_overhead_bytes: "
                f"{self.sparse_budget} left; max_metadata_bytes: {max_indexes} "
                f"chunk indexes; max_image_bytes: {room} bytes left)"
            )
        return best[1], best[0]


def _touched_chunks(runs: list[tuple[int, int]], bits: int) -> Iterator[int]:
    """The chunk numbers (chunk size 2**bits) holding any data of `runs`, ascending."""
    last = -1
    for offset, length in runs:
        first, end = offset >> bits, (offset + length - 1) >> bits
        first = max(first, last + 1)
        yield from range(first, end + 1)
        last = max(last, end)


def _count_touched(runs: list[tuple[int, int]], bits: int) -> int:
    """How many chunks `_touched_chunks` yields, without yielding them."""
    count = 0
    last = -1
    for offset, length in runs:
        first, end = max(offset >> bits, last + 1), (offset + length - 1) >> bits
        if end >= first:
            count += end - first + 1
            last = end
    return count


class _Expand:
    """`read(n)` over a sparse file's logical contents: its runs' bytes (from `read`) with
    zeros between them; `seek` forward skips zeros only (never data)."""

    def __init__(
        self,
        runs: list[tuple[int, int]],
        size: int,
        read: Callable[[int], bytes | memoryview],
    ) -> None:
        self._runs = runs
        self._next = 0  # index of the first run not wholly consumed
        self._size = size
        self._read = read
        self._pos = 0

    def seek(self, pos: int) -> None:
        if pos != self._pos and (
            pos < self._pos or (self._next < len(self._runs) and self._runs[self._next][0] < pos)
        ):
            raise AssertionError("seek over sparse data")
        self._pos = pos

    def read(self, size: int) -> bytes:
        out = []
        while size and self._pos < self._size:
            if self._next < len(self._runs) and self._pos >= self._runs[self._next][0]:
                offset, length = self._runs[self._next]
                n = min(size, offset + length - self._pos)
                data = _read_exact(self._read, n)
                if self._pos + n == offset + length:
                    self._next += 1
            else:
                gap_end = self._runs[self._next][0] if self._next < len(self._runs) else self._size
                n = min(size, gap_end - self._pos, len(ZEROS))
                data = ZEROS[:n]
            self._pos += n
            out.append(data)
            size -= n
        return b"".join(out)


def _write_all(fd: int, pieces: list[bytes | memoryview]) -> None:
    """Write `pieces` at the file offset, in order: `writev` in batches of IOV_MAX."""
    for i in range(0, len(pieces), IOV_MAX):
        batch = pieces[i : i + IOV_MAX]
        total = sum(len(p) for p in batch)
        written = os.writev(fd, batch)
        if written == total:
            continue
        rest = memoryview(b"".join(batch))[written:]  # a short write: rare, finish it plainly
        while rest:
            rest = rest[os.write(fd, rest) :]


def _read_exact(read: Callable[[int], bytes | memoryview], size: int) -> bytes | memoryview:
    data = read(size)
    if len(data) == size:
        return data
    parts = [data]
    got = len(data)
    while got < size:
        more = read(size - got)
        if not more:
            raise InvalidInput(f"unexpected end of data: wanted {size} bytes, got {got}")
        parts.append(more)
        got += len(more)
    return b"".join(parts)


@dataclass
class ImageParams:
    """What the superblock says about the whole image."""

    block_size: int = 4096
    build_time: int = 0
    build_time_nsec: int = 0
    uuid: bytes = b"\0" * 16
    volume_name: bytes = b""
    devices: tuple[DeviceSlot, ...] = ()
    # Give each device its start block in one flat address space: this image's file first,
    # then each device's file back to back (what a flat multi-blob device and erofs-utils
    # expect, and what joining the files whole with `cat` gives).
    unified_addresses: bool = False
    # Blocks each device's *file* takes in that space (default: the slot's `blocks`): a blob
    # file may carry its dm-verity tree after its image, and the next device starts after it.
    device_spans: tuple[int, ...] = ()
    # Blocks this image's own file carries after the image (its appended dm-verity tree),
    # given the image's blocks, which are known only once the metadata is laid out.
    trailing_blocks: Callable[[int], int] | None = None


@dataclass(slots=True)
class _Placed:
    """Per-inode layout decisions, made before anything is written."""

    node: Node
    inode: Inode
    xattrs: XattrIbody
    dir_blocks: list[list[bytes]] | None = None  # directory names, grouped per block
    tail: bytes = b""
    chunk_table: bytes = b""
    pos: int = 0  # byte offset of the inode in the image

    @property
    def meta_size(self) -> int:
        size = self.inode.isize + self.inode.xattr_isize
        if self.chunk_table:
            size = (size + 7) & ~7
            size += len(self.chunk_table)
        return size + len(self.tail)


def write_metadata(
    data: DataWriter, root: Node, params: ImageParams, *, share_xattrs: bool = True
) -> SuperBlock:
    """Lay out and write directories, shared xattrs, inodes and the superblock.

    `data` has placed every file's data already; metadata follows it. Returns the superblock
    written. The file is padded to a whole number of blocks.
    """
    bs = params.block_size
    order = _inode_order(root)
    nlinks = _count_links(root)
    shared, shared_blob = _shared_xattrs(order, bs) if share_xattrs else ({}, b"")
    compactable_time = (params.build_time, params.build_time_nsec)

    placed: list[_Placed] = []
    no_xattrs = XattrIbody()
    for ino, node in enumerate(order, start=1):
        ibody = no_xattrs
        if node.xattrs:
            items = sorted(node.xattrs.items())
            ibody = XattrIbody(
                shared_ids=sorted(shared[kv] for kv in items if kv in shared),
                entries=[XattrEntry(*kv) for kv in items if kv not in shared],
            )
        nlink = nlinks[id(node)]
        extended = (node.mtime, node.mtime_nsec) != compactable_time or not Inode.fits_compact(
            nlink, node.size, node.uid, node.gid
        )
        inode = Inode(
            mode=node.mode,
            extended=extended,
            xattr_icount=ibody.icount,
            nlink=nlink,
            size=node.size,
            ino=ino,
            uid=node.uid,
            gid=node.gid,
            mtime=node.mtime,
            mtime_nsec=node.mtime_nsec,
        )
        placed.append(_Placed(node=node, inode=inode, xattrs=ibody))

    # Directory sizes depend only on names, so every block address can be decided before
    # nids exist; then everything is written in address order.
    for p in placed:
        if p.node.children is not None:
            p.dir_blocks = _dir_block_plan(p.node, bs)
            p.inode.size = (len(p.dir_blocks) - 1) * bs + _block_used(p.dir_blocks[-1])
    cursor = _BlockCursor(data.next_block, bs)
    _choose_layouts(placed, cursor, bs)
    xattr_blkaddr = cursor.take(len(shared_blob)) if shared_blob else 0
    meta_blkaddr = cursor.next_block - 1  # nids start at bs/32, never 0
    meta_start = cursor.next_block * bs
    pos = meta_start
    for p in placed:
        pos = _align_inode(pos, p, bs)
        p.pos = pos
        pos += p.meta_size
    nid_of = {id(p.node): (p.pos - meta_blkaddr * bs) // INODE_SLOT_SIZE for p in placed}
    parent_of = _parents(root)

    for p in placed:
        if p.dir_blocks is not None:
            blocks = _encode_dir(p.node, p.dir_blocks, nid_of, parent_of)
            if p.inode.layout == LAYOUT_FLAT_INLINE:
                p.tail = blocks.pop()
            if blocks:
                cursor.fill(p.inode.i_u, b"".join(_pad(b, bs) for b in blocks))
    if shared_blob:
        cursor.fill(xattr_blkaddr, shared_blob)
    for start, raw in sorted(cursor.pending):
        if data.next_block != start:
            raise AssertionError("metadata blocks out of order")
        data.add_blocks(raw)

    meta = bytearray(pos - meta_start)
    for p in placed:
        off = p.pos - meta_start
        raw = p.inode.pack() + p.xattrs.pack() if p.xattrs.icount else p.inode.pack()
        meta[off : off + len(raw)] = raw
        off += len(raw)
        if p.chunk_table:
            off = (off + 7) & ~7
            meta[off : off + len(p.chunk_table)] = p.chunk_table
            off += len(p.chunk_table)
        meta[off : off + len(p.tail)] = p.tail
    data.add_blocks(bytes(meta))

    feature_incompat = 0
    if any(p.inode.layout == LAYOUT_CHUNK_BASED for p in placed):
        feature_incompat |= FEATURE_INCOMPAT_CHUNKED_FILE
    if params.devices:
        feature_incompat |= FEATURE_INCOMPAT_DEVICE_TABLE
    sb = SuperBlock(
        blkszbits=bs.bit_length() - 1,
        root_nid=nid_of[id(root)],
        inos=len(placed),
        build_time=params.build_time,
        build_time_nsec=params.build_time_nsec,
        blocks=data.next_block,
        meta_blkaddr=meta_blkaddr,
        xattr_blkaddr=xattr_blkaddr,
        uuid=params.uuid,
        volume_name=params.volume_name.ljust(16, b"\0")[:16],
        feature_incompat=feature_incompat,
        extra_devices=len(params.devices),
        devt_slotoff=(SUPER_OFFSET + SUPER_SIZE) // DeviceSlot.SIZE if params.devices else 0,
    )
    data.flush()
    devices = list(params.devices)
    if params.unified_addresses:
        spans = params.device_spans or tuple(slot.blocks for slot in devices)
        if len(spans) != len(devices):
            raise AssertionError("one span per device")
        start = sb.blocks
        if params.trailing_blocks is not None:
            start += params.trailing_blocks(sb.blocks)
        for i, (slot, span) in enumerate(zip(devices, spans, strict=True)):
            if span < slot.blocks:
                raise AssertionError("a device's file is shorter than its image")
            devices[i] = DeviceSlot(slot.tag, slot.blocks, start)
            start += span
    if sb.root_nid > 0xFFFF:
        raise InvalidInput("root inode beyond the 16-bit root nid range")
    head = bytearray(header_blocks(bs, len(params.devices)) * bs)
    head[SUPER_OFFSET : SUPER_OFFSET + SUPER_SIZE] = sb.pack()
    slots = b"".join(d.pack() for d in devices)
    head[SUPER_OFFSET + SUPER_SIZE : SUPER_OFFSET + SUPER_SIZE + len(slots)] = slots
    _write_at(data, 0, bytes(head))
    os.ftruncate(data.fd, data.next_block * bs)
    return sb


class _BlockCursor:
    """Hands out block addresses after the file data; contents are filled in later."""

    def __init__(self, next_block: int, bs: int) -> None:
        self.next_block = next_block
        self.bs = bs
        self.pending: list[tuple[int, bytes]] = []
        self._sizes: dict[int, int] = {}

    def take(self, nbytes: int) -> int:
        start = self.next_block
        nblocks = -(-nbytes // self.bs)
        self._sizes[start] = nblocks
        self.next_block += nblocks
        return start

    def fill(self, start: int, raw: bytes) -> None:
        if -(-len(raw) // self.bs) != self._sizes.pop(start):
            raise AssertionError("filled blocks differ from the reserved count")
        self.pending.append((start, raw))


def _write_at(data: DataWriter, offset: int, raw: bytes) -> None:
    os.pwrite(data.fd, raw, offset)
    if data.observer is not None:
        data.observer(offset, raw)


def _pad(raw: bytes, bs: int) -> bytes:
    return raw + bytes(-len(raw) % bs)


def _inode_order(root: Node) -> list[Node]:
    """Every inode once: root first, then depth-first by sorted name."""
    seen: set[int] = set()
    order: list[Node] = []
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        order.append(node)
        if node.children:
            stack.extend(node.children[name] for name in sorted(node.children, reverse=True))
    return order


def _count_links(root: Node) -> Counter[int]:
    """Link counts: a directory has 2 + its subdirectories, others one per directory entry."""
    links: Counter[int] = Counter()
    for node in _walk_dirs(root):
        links[id(node)] += 2
        for child in node.dir_children().values():
            if child.children is None:
                links[id(child)] += 1
            else:
                links[id(node)] += 1
    return links


def _walk_dirs(root: Node) -> Iterator[Node]:
    stack = [root]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(c for c in node.dir_children().values() if c.children is not None)


def _shared_xattrs(order: list[Node], bs: int) -> tuple[dict[tuple[bytes, bytes], int], bytes]:
    """Xattrs carried by more than one inode go once into the shared area."""
    counts = Counter((k, v) for node in order for k, v in node.xattrs.items())
    ids: dict[tuple[bytes, bytes], int] = {}
    blob = bytearray()
    for key, count in sorted(counts.items()):
        if count < 2:
            continue
        ids[key] = len(blob) // 4
        blob += XattrEntry(*key).pack()
    return ids, bytes(blob)


def _dir_block_plan(node: Node, bs: int) -> list[list[bytes]]:
    """The directory's names, sorted (`.` and `..` included), grouped into blocks.

    Sizes depend only on names, so the grouping is fixed before nids exist; `_encode_dir`
    writes each group as one block once they do."""
    groups: list[list[bytes]] = [[]]
    used = 0
    for name in sorted([b".", b"..", *node.dir_children()]):
        need = Dirent.SIZE + len(name)
        if used + need > bs:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += need
    return groups


def _block_used(names: list[bytes]) -> int:
    """Bytes a directory block of these names takes: the dirents, then the names."""
    return Dirent.SIZE * len(names) + sum(map(len, names))


def _encode_dir(
    node: Node, groups: list[list[bytes]], nid_of: dict[int, int], parent_of: dict[int, Node]
) -> list[bytes]:
    """One directory block per group of `_dir_block_plan`, with the nids now known."""
    parent_nid = nid_of[id(parent_of[id(node)])]
    dir_type = file_type(stat.S_IFDIR)
    children = node.dir_children()
    out: list[bytes] = []
    for names in groups:
        nameoff = Dirent.SIZE * len(names)
        ents = bytearray()
        for name in names:
            if name == b".":
                nid, ftype = nid_of[id(node)], dir_type
            elif name == b"..":
                nid, ftype = parent_nid, dir_type
            else:
                child = children[name]
                nid, ftype = nid_of[id(child)], file_type(child.mode)
            ents += Dirent(nid, nameoff, ftype).pack()
            nameoff += len(name)
        out.append(bytes(ents) + b"".join(names))
    return out


def _choose_layouts(placed: list[_Placed], cursor: _BlockCursor, bs: int) -> None:
    """Pick each inode's data layout, give directory blocks their addresses."""
    for p in placed:
        node, inode = p.node, p.inode
        if stat.S_ISCHR(node.mode) or stat.S_ISBLK(node.mode):
            inode.i_u = encode_dev(*node.rdev)
            continue
        if p.dir_blocks is not None:
            _layout_dir(p, p.dir_blocks, cursor, bs)
            continue
        if node.symlink is not None:
            target = node.symlink
            inode.size = len(target)
            if _fits_inline(p, len(target), bs):
                inode.layout = LAYOUT_FLAT_INLINE
                p.tail = target
            else:
                inode.i_u = cursor.take(len(target))
                cursor.fill(inode.i_u, target)
            continue
        fd = node.data
        if isinstance(fd, Extent):
            inode.i_u = fd.start
        elif isinstance(fd, InlineTail) and _fits_inline(p, len(fd.tail), bs):
            inode.layout = LAYOUT_FLAT_INLINE
            inode.i_u = fd.head.start if fd.head else 0
            p.tail = fd.tail
        elif isinstance(fd, InlineTail):
            # The tail does not fit beside the inode: give it a block of its own and address
            # head and tail block by block.
            tail_block = cursor.take(len(fd.tail))
            cursor.fill(tail_block, fd.tail)
            head = [fd.head.start + i for i in range(fd.head.nblocks)] if fd.head else []
            inode.layout = LAYOUT_CHUNK_BASED
            inode.i_u = CHUNK_FORMAT_INDEXES  # chunkbits 0: one index per block
            p.chunk_table = ChunkIndex.pack_table([*head, tail_block], None)
        elif isinstance(fd, Chunks):
            inode.layout = LAYOUT_CHUNK_BASED
            inode.i_u = fd.chunkbits | CHUNK_FORMAT_INDEXES
            p.chunk_table = _pack_chunk_table(fd)


def _pack_chunk_table(fd: Chunks) -> bytes:
    """The chunk indexes of `fd`; 8 bytes each without per-index Python objects when every
    chunk is on the primary device (tables of sparse files can be millions long)."""
    if fd.devices is not None or fd.blkaddrs.typecode != "I":
        return ChunkIndex.pack_table(fd.blkaddrs, fd.devices)
    # <HHI with advise 0 and device 0: a zero u32, then the block address.
    table = array("I", bytes(8 * len(fd.blkaddrs)))
    table[1::2] = fd.blkaddrs
    if sys.byteorder == "big":
        table.byteswap()
    return table.tobytes()


def _fits_inline(p: _Placed, tail_len: int, bs: int) -> bool:
    return 0 < tail_len < bs and p.inode.isize + p.inode.xattr_isize + tail_len <= bs


def _layout_dir(p: _Placed, dir_blocks: list[list[bytes]], cursor: _BlockCursor, bs: int) -> None:
    """A directory: whole blocks as an extent, the last partial block inline when it fits."""
    whole = len(dir_blocks) - 1
    tail_len = _block_used(dir_blocks[-1])
    if _fits_inline(p, tail_len, bs):
        p.inode.layout = LAYOUT_FLAT_INLINE
        p.inode.i_u = cursor.take(whole * bs) if whole else 0
        p.tail = bytes(tail_len)  # its length counts now; real entries once nids exist
    else:
        p.inode.i_u = cursor.take((whole + 1) * bs)


def _align_inode(pos: int, p: _Placed, bs: int) -> int:
    """Inodes are 32-byte aligned; inline data must not cross a block boundary."""
    pos = (pos + INODE_SLOT_SIZE - 1) & ~(INODE_SLOT_SIZE - 1)
    if p.tail:
        tail_start = pos + p.meta_size - len(p.tail)
        if tail_start // bs != (tail_start + len(p.tail) - 1) // bs:
            pos = -(-pos // bs) * bs
    return pos


def _parents(root: Node) -> dict[int, Node]:
    """Each directory's parent, for its '..' entry (the root is its own parent)."""
    parent_of = {id(root): root}
    for node in _walk_dirs(root):
        for child in node.dir_children().values():
            if child.is_dir:
                parent_of[id(child)] = node
    return parent_of
