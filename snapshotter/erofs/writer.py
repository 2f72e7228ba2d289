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

import errno
import os
import sys
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from operator import attrgetter

from snapshotter.erofs.format import (
    CHUNK_FORMAT_INDEXES,
    COMMON_MTIME,
    DIR_BLOCK_PLAN,
    FEATURE_INCOMPAT_CHUNKED_FILE,
    FEATURE_INCOMPAT_DEVICE_TABLE,
    FILE_COLUMNS,
    LAYOUT_CHUNK_BASED,
    LAYOUT_FLAT_INLINE,
    NULL_ADDR,
    SUPER_OFFSET,
    SUPER_SIZE,
    WALK_TREE,
    ChunkIndex,
    DeviceSlot,
    Inode,
    SuperBlock,
    XattrEntry,
    XattrIbody,
    encode_dev,
    layout_inode_table,
    layout_inode_table_filling_gaps,
    pack_dir_blocks,
    pack_inode_table,
)
from snapshotter.erofs.limits import DEFAULT_LIMITS, Limits
from snapshotter.erofs.tree import (
    Chunks,
    Extent,
    FileData,
    InlineTail,
    Node,
    PackedChunks,
    pick_build_time,
)
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
# copy_file_range refusing these files (another file system before Linux 5.3 or from 5.19,
# an O_APPEND or special file, a kernel without it): DataWriter.add_file_fd copies by hand.
_NO_KERNEL_COPY = frozenset(
    {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF, errno.EPERM}
)
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
        tail_packing: bool = False,
        early_writeback: bool = False,
    ) -> None:
        """`limits`: the layer's ceilings (image bytes, sparse overhead); None for sources
        that are not untrusted layers (a directory commit, a merge): only the format's
        32-bit block addresses bound them.

        `early_writeback`: for an image that will be fsynced, start the disk writes of each
        batch as it is written (`start_writeback`), so the final fsync waits for little
        more than the metadata: the disk works while the source is still being read.

        `tail_packing`: a larger file stored as one extent keeps its last partial block
        inline after its inode (FLAT_INLINE), as mkfs.erofs does by default, when the
        inode and its xattrs leave room for it in one block; else it takes whole blocks."""
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
        self.tail_packing = tail_packing
        self._writeback = start_writeback if early_writeback else None
        self._inline_budget = INLINE_BUDGET
        self._zero_chunk = bytes(hole_chunk)
        self._zero_view = memoryview(self._zero_chunk)
        self._pieces: list[bytes | memoryview] = []  # written at the next flush, in order
        self._pending = 0  # bytes in _pieces (whole blocks)
        self._copy_buffer: bytearray | None = None  # add_file_fd's read buffer
        self._kernel_copy = True  # copy_file_range works between these files
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
        if self._writeback is not None:
            self._writeback(self.fd, offset, self._pending)
        self._pieces = []
        self._pending = 0

    def _pad(self, data: bytes) -> bytes:
        rem = len(data) % self.block_size
        return data + bytes(self.block_size - rem) if rem else data

    def add_blocks(self, data: bytes) -> Extent:
        """Write raw data (zero-padded to whole blocks) contiguously."""
        first = self._emit_padded([data], len(data))
        return Extent(first, -(-len(data) // self.block_size))

    def add_file(
        self,
        read: Callable[[int], bytes | memoryview],
        size: int,
        xattrs: dict[bytes, bytes] | None = None,
    ) -> FileData:
        """Copy `size` bytes from `read` into the image.

        `read(n)` may return fewer than n bytes (pieces are written as they come, without
        being joined); an empty read before `size` bytes is an EpError (a truncated source).
        All-zero aligned chunks of `hole_chunk` bytes are not written; if any were found the
        file becomes chunk-based with holes, else one contiguous extent. With tail packing,
        a contiguous file's last partial block is kept (an `InlineTail` with a head) when
        it fits after the inode and `xattrs` (the file's, bounding its inode's size).
        """
        if size == 0:
            return None
        if size <= self.inline_max and self._inline_budget >= size:
            # Tiny files live inline after their inode: a 4 KiB block each would be ~90% of
            # a rootfs layer's size in some directories. The budget bounds the memory held.
            self._inline_budget -= size
            return InlineTail(None, bytes(_read_exact(read, size)))
        rem = self._packed_tail(size, xattrs)
        if rem:
            head = self._add_whole(read, size - rem)
            return self._with_tail(head, bytes(_read_exact(read, rem)), size)
        return self._add_whole(read, size)

    def _packed_tail(self, size: int, xattrs: dict[bytes, bytes] | None) -> int:
        """The bytes of a `size`-byte file's last partial block that go inline after its
        inode (tail packing, when the inode and `xattrs` leave room), taken from the inline
        budget; 0 when the file is stored in whole blocks."""
        rem = size % self.block_size
        if (
            rem
            and self.tail_packing
            and self._inline_budget >= rem
            and _max_inode_head(xattrs) + rem <= self.block_size
        ):
            self._inline_budget -= rem
            return rem
        return 0

    def _with_tail(self, head: FileData, tail: bytes, size: int) -> FileData:
        """A tail-packed file's data: `head` in whole blocks and `tail` inline, unless holes
        in the head made it chunked; then the tail is the last block of its last chunk,
        after it, and gives its inline budget back."""
        if head is None or isinstance(head, Extent):
            return InlineTail(head, tail)
        assert isinstance(head, Chunks)
        if (size - len(tail)) % self.hole_chunk == 0:
            head.blkaddrs.append(self.next_block)
        self._emit_padded([tail], len(tail))
        self._inline_budget += len(tail)
        return head

    def _add_whole(self, read: Callable[[int], bytes | memoryview], size: int) -> FileData:
        """`size` bytes of file data in whole blocks (the last one zero-padded)."""
        if size == 0:
            return None
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
                if _is_hole(piece, zero):
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

    def add_file_fd(
        self,
        fd: int,
        size: int,
        xattrs: dict[bytes, bytes] | None = None,
        seen: Callable[[bytes | memoryview], None] | None = None,
    ) -> FileData:
        """`add_file` for the first `size` bytes of a regular file open as `fd`: the same
        bytes placed the same way, the data copied in the kernel (`copy_file_range`).

        The data is still read (`preadv` into one reused buffer, never allocated per read):
        all-zero `hole_chunk` chunks are judged on it and left out as `add_file` does, and
        `seen` (e.g. a content digest's update) gets every byte, in order. What is copied
        is each run of non-zero chunks, straight from `fd` into its place in the image.
        Files smaller than a hole chunk, files stored inline, and any writer with an
        observer (which must see the written bytes) go through `add_file`'s read path.
        A file that ends before `size` is an EpError, as in `add_file`. The caller checks
        that the file did not change between the read and the copy (fstat before/after)."""
        if (
            size < self.hole_chunk
            or self.observer is not None
            or (size <= self.inline_max and self._inline_budget >= size)
        ):
            pos = 0

            def read(n: int) -> bytes:
                nonlocal pos
                chunk = os.pread(fd, n, pos)
                pos += len(chunk)
                if seen is not None:
                    seen(chunk)
                return chunk

            return self.add_file(read, size, xattrs)
        rem = self._packed_tail(size, xattrs)
        if rem:  # add_file's tail-packing rule, the head copied and the tail read
            head = self._copy_large(fd, size - rem, seen)
            tail = _pread_exact(fd, rem, size - rem, size)
            if seen is not None:
                seen(tail)
            return self._with_tail(head, tail, size)
        return self._copy_large(fd, size, seen)

    def _copy_large(
        self, fd: int, size: int, seen: Callable[[bytes | memoryview], None] | None
    ) -> FileData:
        """`_add_whole` for `size` bytes at the start of `fd`, runs copied in the kernel."""
        if size == 0:
            return None
        chunk = self.hole_chunk
        if size < chunk:  # the head of a tail-packed file: a short extent
            data = _pread_exact(fd, size, 0, size)
            if seen is not None:
                seen(data)
            first = self._emit_padded([data], size)
            return Extent(first, -(-size // self.block_size))
        bs = self.block_size
        if self._copy_buffer is None or len(self._copy_buffer) < max(READ_SIZE, chunk):
            self._copy_buffer = bytearray(max(READ_SIZE, chunk))
        buf = memoryview(self._copy_buffer)
        zero = self._zero_chunk
        addrs = array("I")
        start = self.next_block
        run_at = 0  # file offset of the run of non-zero chunks not copied yet
        run_bytes = 0
        pos = 0
        while pos < size:
            n = min(len(buf), size - pos)
            got = 0
            while got < n:  # whole buffers: chunks are judged at their offsets in the file
                more = os.preadv(fd, [buf[got:n]], pos + got)
                if not more:
                    raise InvalidInput(
                        f"unexpected end of data: wanted {size} bytes, got {pos + got}"
                    )
                got += more
            view = buf[:n]
            if seen is not None:
                seen(view)
            for off in range(0, n, chunk):
                piece = view[off : off + chunk]
                if _is_hole(piece, zero):
                    if run_bytes:
                        self._copy_run(fd, run_at, run_bytes)
                        run_bytes = 0
                    addrs.append(NULL_ADDR)
                else:
                    if not run_bytes:
                        run_at = pos + off
                    addrs.append(self.next_block + run_bytes // bs)
                    run_bytes += len(piece)
            pos += n
        if run_bytes:
            self._copy_run(fd, run_at, run_bytes)
        assert len(addrs) == -(-size // chunk)
        if NULL_ADDR not in addrs:
            return Extent(start, self.next_block - start)
        return Chunks((chunk // bs).bit_length() - 1, addrs)

    def _copy_run(self, src: int, src_offset: int, length: int) -> None:
        """Copy `length` bytes of `src` from `src_offset` to the cursor, zero-padded to whole
        blocks; `copy_file_range` where the kernel can, else pread/pwrite."""
        bs = self.block_size
        self.flush()  # what is gathered goes first: the file offset is then the cursor
        dst = self.next_block * bs
        blocks = -(-length // bs)
        self.next_block += blocks
        self._check_size()
        done = 0
        while done < length:
            n = 0
            if self._kernel_copy:
                try:
                    n = os.copy_file_range(
                        src, self.fd, length - done, src_offset + done, dst + done
                    )
                except OSError as exc:
                    if exc.errno not in _NO_KERNEL_COPY:
                        raise
                    self._kernel_copy = False
                    continue
            else:
                data = os.pread(src, min(READ_SIZE, length - done), src_offset + done)
                n = len(data)
                if n:
                    _write_all_at(self.fd, data, dst + done)
            if not n:
                raise InvalidInput(
                    f"unexpected end of data: wanted {length} bytes at {src_offset}, got {done}"
                )
            done += n
        os.lseek(self.fd, dst + length, os.SEEK_SET)
        pad = blocks * bs - length
        if pad:  # written with what is gathered next, in order
            self._pieces.append(self._zero_view[:pad])
            self._pending += pad

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


def _is_hole(piece: memoryview, zero: bytes) -> bool:
    """Whether `piece` is a whole hole chunk (`zero`: that many zero bytes; a file's short
    last chunk never is). memoryview == bytes compares item by item (~12 ms per zero MiB):
    a look at both ends, then a copy and memcmp for what may be a hole."""
    return len(piece) == len(zero) and not piece[0] and not piece[-1] and piece.tobytes() == zero


def _max_inode_head(xattrs: dict[bytes, bytes] | None) -> int:
    """The most bytes an inode with `xattrs` can take before its inline data: an extended
    inode and every xattr stored in its body (sharing and compact inodes only shrink it;
    the full name bounds the stored suffix)."""
    if not xattrs:
        return 64
    return 64 + 12 + sum((4 + len(k) + len(v) + 3) & ~3 for k, v in xattrs.items())


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's sync_file_range(2) (Linux; Python's os module has no binding), or None."""
    try:
        import ctypes  # the CLI and the service import it anyway

        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (ImportError, OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE: list[Callable[[int, int, int, int], int] | None] = []  # looked up once
SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing `length` bytes at `offset` of `fd` to disk, without
    waiting (sync_file_range(SYNC_FILE_RANGE_WRITE)): a hint that makes a later fsync
    shorter, never a guarantee (the fsync still is one), so failures are ignored. Minbase
    (210 MB): import, hash and fsync 0.340 -> 0.265 s (median of 7 interleaved rounds)."""
    if not _SYNC_FILE_RANGE:
        _SYNC_FILE_RANGE.append(_sync_file_range() if sys.platform == "linux" else None)
    fn = _SYNC_FILE_RANGE[0]
    if fn is not None and length > 0:
        fn(fd, offset, length, SYNC_FILE_RANGE_WRITE)


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


def _write_all_at(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _pread_exact(fd: int, n: int, offset: int, size: int) -> bytes:
    """`n` bytes of `fd` at `offset` (of a file of `size` bytes): a short file is an EpError."""
    parts = []
    got = 0
    while got < n:
        more = os.pread(fd, n - got, offset + got)
        if not more:
            raise InvalidInput(f"unexpected end of data: wanted {size} bytes, got {offset + got}")
        parts.append(more)
        got += len(more)
    return parts[0] if len(parts) == 1 else b"".join(parts)


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
    # Instead: the most common mtime of the tree's inodes (`pick_build_time`), counted on the
    # inodes as they are written (each once) rather than by a walk of the caller's.
    build_time_from_tree: bool = False
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
    # Fill the room an inode leaves when its inline tail would cross a block with later
    # inodes (what tail packing needs to pay off); off, the layout of images before it.
    fill_gaps: bool = False


def write_metadata(
    data: DataWriter, root: Node, params: ImageParams, *, share_xattrs: bool = True
) -> SuperBlock:
    """Lay out and write directories, shared xattrs, inodes and the superblock.

    `data` has placed every file's data already; metadata follows it. Returns the superblock
    written. The file is padded to a whole number of blocks.

    The layout is decided in columns (one list per field, indexed by inode order) rather than
    an object per inode: a merge writes hundreds of thousands of inodes, and objects per
    inode were a third of its time and most of its memory. The bytes are those of
    `Inode.pack`, `XattrIbody.pack`, `ChunkIndex` and `Dirent` (format.py).
    """
    bs = params.block_size
    order, links, parents = _walk_tree(root)
    shared, shared_blob = _shared_xattrs(order, bs) if share_xattrs else ({}, b"")
    if params.build_time_from_tree:
        picked = None if COMMON_MTIME is None else COMMON_MTIME(order)  # compiled, same pick
        if picked is None:
            picked = pick_build_time(Counter(map(attrgetter("mtime", "mtime_nsec"), order)))
        ct_sec, ct_nsec = picked
    else:
        ct_sec, ct_nsec = params.build_time, params.build_time_nsec
    cursor = _BlockCursor(data.next_block, bs)
    take = cursor.take
    fits_compact = Inode.fits_compact
    count = len(order)

    # Columns: the inode's header bytes (inode + xattrs), layout, i_u, size, link count,
    # xattr area, chunk table and inline tail.
    heads = [0] * count
    layouts = bytearray(count)
    i_us = [0] * count
    sizes = [0] * count
    xbodies: dict[int, bytes] = {}
    tables: list[bytes | None] = [None] * count
    tails: dict[int, bytes] = {}
    dir_groups: dict[int, list[list[bytes]]] = {}
    any_chunked = False
    remote_heads: dict[int, Extent] = {}
    # Fill the room a crossing tail leaves (see below): asked for, or needed by a merge's
    # tails after whole blocks (no fsmeta had those before: earlier fsmetas keep their bytes).
    fill_gaps = params.fill_gaps
    tail: bytes | None
    # A merge's common file (PackedChunks, no xattrs) in one compiled call, the same values
    # as the loop below gives it; the loop does every other inode, in order.
    rest: Iterable[int] = range(count)
    if FILE_COLUMNS is not None:
        got = FILE_COLUMNS(
            order, links, ct_sec, ct_nsec, PackedChunks, heads, layouts, i_us, sizes, tables
        )
        if got is not None:
            rest, handled = got
            any_chunked = handled > 0
    for i in rest:
        node = order[i]
        mode, size = node.mode, node.size
        icount = 0
        if node.xattrs:
            items = sorted(node.xattrs.items())
            ibody = XattrIbody(
                shared_ids=sorted(shared[kv] for kv in items if kv in shared),
                entries=[XattrEntry(*kv) for kv in items if kv not in shared],
            )
            icount = ibody.icount
            if icount:
                xbodies[i] = ibody.pack()
        nlink = links[i]
        if (
            node.mtime == ct_sec
            and node.mtime_nsec == ct_nsec
            and fits_compact(nlink, size, node.uid, node.gid)
        ):
            head = 32  # compact: its mtime is the build time
        else:
            head = 64
        if icount:
            head += 12 + 4 * (icount - 1)
        heads[i] = head
        fd = node.data
        fmt = mode & 0o170000
        if type(fd) is PackedChunks:  # first: most of a merge's inodes (only files have data)
            layouts[i] = LAYOUT_CHUNK_BASED
            i_us[i] = fd.chunkbits | CHUNK_FORMAT_INDEXES
            tables[i] = fd.table
            any_chunked = True
        elif fmt == 0o020000 or fmt == 0o060000:  # character or block device
            i_us[i] = encode_dev(*node.rdev)
        elif node.children is not None:
            groups, tail_len = _dir_block_plan(node.children, bs)
            dir_groups[i] = groups
            whole = len(groups) - 1
            size = whole * bs + tail_len
            if 0 < tail_len < bs and head + tail_len <= bs:
                layouts[i] = LAYOUT_FLAT_INLINE
                i_us[i] = take(whole * bs) if whole else 0
                tails[i] = bytes(tail_len)  # its length counts now; entries once nids exist
            else:
                i_us[i] = take((whole + 1) * bs)
        elif node.symlink is not None:
            target = node.symlink
            size = len(target)
            if 0 < size < bs and head + size <= bs:
                layouts[i] = LAYOUT_FLAT_INLINE
                tails[i] = target
            else:
                i_us[i] = take(size)
                cursor.fill(i_us[i], target)
        elif fd is None:
            pass
        elif isinstance(fd, Extent):
            i_us[i] = fd.start
        elif isinstance(fd, InlineTail):
            tail = fd.tail
            fhead = fd.head
            if (
                0 < len(tail) < bs
                and head + len(tail) <= bs
                and (fhead is None or fhead.device == 0 or params.unified_addresses)
            ):
                layouts[i] = LAYOUT_FLAT_INLINE
                tails[i] = tail
                if fhead is None:
                    i_us[i] = 0
                elif fhead.device == 0:
                    i_us[i] = fhead.start
                else:
                    # Whole blocks on a device (a merge of tail-packed layers): addressed in
                    # the flat space, once the devices' starts are known.
                    remote_heads[i] = fhead
                    fill_gaps = True
            else:
                # The tail does not fit beside the inode: give it a block of its own and
                # address head and tail block by block.
                tail_block = take(len(tail))
                cursor.fill(tail_block, tail)
                nhead = fhead.nblocks if fhead else 0
                head_blocks = [fhead.start + b for b in range(nhead)] if fhead else []
                layouts[i] = LAYOUT_CHUNK_BASED
                i_us[i] = CHUNK_FORMAT_INDEXES  # chunkbits 0: one index per block
                tables[i] = ChunkIndex.pack_table(
                    [*head_blocks, tail_block],
                    [fhead.device] * nhead + [0] if fhead and fhead.device else None,
                )
                any_chunked = True
        elif isinstance(fd, Chunks):
            layouts[i] = LAYOUT_CHUNK_BASED
            i_us[i] = fd.chunkbits | CHUNK_FORMAT_INDEXES
            tables[i] = _pack_chunk_table(fd)
            any_chunked = True
        sizes[i] = size

    xattr_blkaddr = take(len(shared_blob)) if shared_blob else 0
    meta_blkaddr = cursor.next_block - 1  # nids start at bs/32, never 0
    meta_start = cursor.next_block * bs

    # Inodes are 32-byte aligned; inline data must not cross a block boundary. With
    # fill_gaps (tail packing), the room an inode moved to the next block leaves is taken by a
    # later inode that fits in it (format.py `layout_inode_table_filling_gaps`).
    base = meta_blkaddr * bs
    chunk_tables = tables if any_chunked else None
    layout = layout_inode_table_filling_gaps if fill_gaps else layout_inode_table
    nids, meta_end = layout(heads, chunk_tables, tails, meta_start, base, bs)
    # The image ends with the inodes: its size, and so where each device starts in the flat
    # address space, is known now.
    image_blocks = cursor.next_block + -(-(meta_end - meta_start) // bs)
    device_starts = _device_starts(params, image_blocks)
    for i, fhead in remote_heads.items():
        addr = device_starts[fhead.device - 1] + fhead.start
        if addr + fhead.nblocks > MAX_BLOCKS:
            raise InvalidInput("the layers' blocks exceed EROFS's 32-bit flat address space")
        i_us[i] = addr
    nid_of = dict(zip(map(id, order), nids, strict=True))

    for i, groups in dir_groups.items():
        node = order[i]
        parent_nid = nids[parents[i]]
        blocks = pack_dir_blocks(groups, node.dir_children(), nid_of, nids[i], parent_nid)
        if layouts[i] == LAYOUT_FLAT_INLINE:
            tails[i] = blocks.pop()
        if blocks:
            cursor.fill(i_us[i], b"".join(_pad(b, bs) for b in blocks))
    if shared_blob:
        cursor.fill(xattr_blkaddr, shared_blob)
    for start, raw in sorted(cursor.pending):
        if data.next_block != start:
            raise AssertionError("metadata blocks out of order")
        data.add_blocks(raw)

    meta = bytearray(meta_end - meta_start)
    pack_inode_table(
        meta, order, nids, heads, layouts, links, sizes, i_us, xbodies, chunk_tables, tails,
        base - meta_start,
    )  # fmt: skip
    view = memoryview(meta)
    step = WRITE_BUFFER
    for start in range(0, len(meta), step):
        data.add_blocks(view[start : start + step].tobytes())
    view.release()
    del meta

    feature_incompat = FEATURE_INCOMPAT_CHUNKED_FILE if any_chunked else 0
    if params.devices:
        feature_incompat |= FEATURE_INCOMPAT_DEVICE_TABLE
    sb = SuperBlock(
        blkszbits=bs.bit_length() - 1,
        root_nid=nids[0],
        inos=count,
        build_time=ct_sec,
        build_time_nsec=ct_nsec,
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
    if sb.blocks != image_blocks:
        raise AssertionError("the image's blocks differ from its layout")
    devices = list(params.devices)
    if params.unified_addresses:
        for i, (slot, start) in enumerate(zip(devices, device_starts, strict=True)):
            devices[i] = DeviceSlot(slot.tag, slot.blocks, start)
    if sb.root_nid > 0xFFFF:
        raise InvalidInput("root inode beyond the 16-bit root nid range")
    header = bytearray(header_blocks(bs, len(params.devices)) * bs)
    header[SUPER_OFFSET : SUPER_OFFSET + SUPER_SIZE] = sb.pack()
    slots = b"".join(d.pack() for d in devices)
    header[SUPER_OFFSET + SUPER_SIZE : SUPER_OFFSET + SUPER_SIZE + len(slots)] = slots
    _write_at(data, 0, bytes(header))
    os.ftruncate(data.fd, data.next_block * bs)
    return sb


def _device_starts(params: ImageParams, image_blocks: int) -> list[int]:
    """Each device's start block in the flat address space (`unified_addresses`): this
    image's file first (its blocks and any trailing ones), then each device's file."""
    if not params.unified_addresses:
        return [0] * len(params.devices)
    spans = params.device_spans or tuple(slot.blocks for slot in params.devices)
    if len(spans) != len(params.devices):
        raise AssertionError("one span per device")
    start = image_blocks
    if params.trailing_blocks is not None:
        start += params.trailing_blocks(image_blocks)
    starts = []
    for slot, span in zip(params.devices, spans, strict=True):
        if span < slot.blocks:
            raise AssertionError("a device's file is shorter than its image")
        starts.append(start)
        start += span
    return starts


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


def _walk_tree_pure(root: Node) -> tuple[list[Node], list[int], list[int]]:
    """In one walk: every inode once (root first, then depth-first by sorted name), each
    one's link count (a directory has 2 + its subdirectories, others one per directory
    entry) and each directory's parent as its index in the order, for its '..' entry (the
    root is its own parent; 0 for non-directories)."""
    seen: set[int] = set()
    order: list[Node] = []
    links: dict[int, int] = {}
    parent_of = {id(root): 0}
    stack = [root]
    while stack:
        node = stack.pop()
        key = id(node)
        if key in seen:
            continue
        seen.add(key)
        index = len(order)
        order.append(node)
        children = node.children
        if children is None:
            continue
        links[key] = links.get(key, 0) + 2
        subdirs = 0
        for child in children.values():
            ckey = id(child)
            if child.children is None:
                links[ckey] = links.get(ckey, 0) + 1
            else:
                subdirs += 1
                parent_of[ckey] = index
        links[key] += subdirs
        if children:
            stack.extend([children[name] for name in sorted(children, reverse=True)])
    return order, [links[id(n)] for n in order], [parent_of.get(id(n), 0) for n in order]


def _walk_tree(root: Node) -> tuple[list[Node], list[int], list[int]]:
    """`_walk_tree_pure`, compiled where it can be (fsmeta/_mergepack.c `walk_tree`: the
    same lists, the nodes counted by address instead of by `id` in dicts)."""
    if WALK_TREE is not None:
        got = WALK_TREE(root)
        if got is not None:
            return got
    return _walk_tree_pure(root)


def _shared_xattrs(order: list[Node], bs: int) -> tuple[dict[tuple[bytes, bytes], int], bytes]:
    """Xattrs carried by more than one inode go once into the shared area."""
    counts = Counter((k, v) for node in order if node.xattrs for k, v in node.xattrs.items())
    ids: dict[tuple[bytes, bytes], int] = {}
    blob = bytearray()
    for key, count in sorted(counts.items()):
        if count < 2:
            continue
        ids[key] = len(blob) // 4
        blob += XattrEntry(*key).pack()
    return ids, bytes(blob)


def _dir_block_plan_pure(children: dict[bytes, Node], bs: int) -> tuple[list[list[bytes]], int]:
    """The directory's names, sorted (`.` and `..` included), grouped into blocks, and the
    bytes the last block takes (its dirents, then its names).

    Sizes depend only on names, so the grouping is fixed before nids exist; the entries are
    written block by block once they do."""
    groups: list[list[bytes]] = [[]]
    group = groups[0]
    used = 0
    for name in sorted([b".", b"..", *children]):
        need = 12 + len(name)  # Dirent.SIZE and the name
        if used + need > bs:
            group = []
            groups.append(group)
            used = 0
        group.append(name)
        used += need
    return groups, used


def _dir_block_plan(children: dict[bytes, Node], bs: int) -> tuple[list[list[bytes]], int]:
    """`_dir_block_plan_pure`, compiled where it can be (fsmeta/_mergepack.c)."""
    if DIR_BLOCK_PLAN is not None:
        got = DIR_BLOCK_PLAN(children, bs)
        if got is not None:
            return got
    return _dir_block_plan_pure(children, bs)


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
