"""dm-verity for images as they are written: the glue between the EROFS writer's write
stream and `snapshotter.verity`'s tree builder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import mmap
import os
import queue
import threading
from typing import BinaryIO

from snapshotter.errors import CorruptImage
from snapshotter.verity import VerityInfo, VerityParams, VerityTreeBuilder, hashing


class VerityFeed:
    """Feeds dm-verity leaves from the image's sequential writes.

    Everything after the header is written in order; the header (superblock block) is written
    last. So leaves are hashed for each whole verity block of the sequential part as it
    passes, and the head is hashed at the end from the file (one block, still in cache).

    With `threaded` (the default when the compiled loop serves the tree's hash, see
    `snapshotter.verity.hashing`) the hashing runs in a background thread fed through a queue
    of at most QUEUE_DEPTH pieces, so the writer's thread goes on parsing and writing while the
    leaves are hashed; with the compiled hashing loop (`snapshotter.verity.hashing`) the
    hashing releases the GIL and takes the second core. Leaves are recorded by block index,
    so the tree is the same whatever the timing. An error in the thread is raised by the
    next `observe` or by `finish`; `close()` stops the thread (on any path).
    """

    QUEUE_DEPTH = 4

    def __init__(
        self,
        builder: VerityTreeBuilder,
        block_size: int,
        seq_start: int,
        threaded: bool | None = None,
    ) -> None:
        """`threaded` None: a thread only when hashing releases the GIL (the compiled loop);
        the pure loop holds it, and a thread of it would only take turns with the writer."""
        if threaded is None:
            threaded = (
                hashing.ACCELERATED and builder.params.hash_name in hashing.ACCELERATED_HASHES
            )
        self.builder = builder
        self.dbs = block_size
        self.first_hashed = -(-seq_start // block_size) * block_size
        self.expect = seq_start
        self.pending = bytearray()
        self.pending_at = self.first_hashed
        self._error: BaseException | None = None
        self._queue: queue.Queue[tuple[int, bytes | bytearray | memoryview] | None] | None = None
        self._thread: threading.Thread | None = None
        if threaded:
            self._queue = queue.Queue(self.QUEUE_DEPTH)
            self._thread = threading.Thread(target=self._work, name="verity-feed", daemon=True)
            self._thread.start()

    def _work(self) -> None:
        assert self._queue is not None
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self.builder.hash_blocks(*item)
                except BaseException as exc:  # raised in the writer's thread
                    self._error = exc

    def _hash(self, first_block: int, data: bytes | bytearray | memoryview) -> None:
        if self._error is not None:
            raise self._error
        if self._queue is None:
            self.builder.hash_blocks(first_block, data)
        else:
            self._queue.put((first_block, data))

    def close(self) -> None:
        """Stop the hashing thread (idempotent); `finish` does it too."""
        if self._thread is not None and self._queue is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def observe(self, offset: int, data: bytes | memoryview) -> None:
        """`data` written at `offset`: kept by the feed until hashed, not to be changed."""
        if offset != self.expect:
            if offset + len(data) <= self.first_hashed:
                return  # the header, hashed in finish()
            raise AssertionError(f"non-sequential image write at {offset}")
        self.expect += len(data)
        skip = max(0, self.first_hashed - offset)
        view = memoryview(data)[skip:]
        if not self.pending and len(view) % self.dbs == 0:
            self._hash(self.pending_at // self.dbs, view)
            self.pending_at += len(view)
            return
        self.pending += view
        whole = len(self.pending) - len(self.pending) % self.dbs
        if whole:
            self._hash(self.pending_at // self.dbs, bytes(self.pending[:whole]))
            del self.pending[:whole]
            self.pending_at += whole

    def finish(self, fd: int) -> int:
        """Hash the head and the zero-padded last block; returns the data size in bytes."""
        end = self.pending_at
        if self.pending:
            last = bytes(self.pending) + bytes(-len(self.pending) % self.dbs)
            self._hash(self.pending_at // self.dbs, last)
            end += len(last)
        self.close()
        if self._error is not None:
            raise self._error
        if self.first_hashed:
            head = os.pread(fd, self.first_hashed, 0)
            self.builder.hash_blocks(0, head)
        return end


def verity_builder(
    verity: VerityParams | bool, default_salt: bytes
) -> tuple[VerityTreeBuilder, VerityParams]:
    """A tree builder; `True` means containerd's geometry. Without a salt of its own, the
    tree is salted with `default_salt`, which the caller derives from content (a layer:
    `derive_layer_salt` of its UUID; an fsmeta: `derive_salt` of its digest), so the same
    content gets the same root; `VerityParams(unsalted=True)` (`KATA_VERITY`) keeps the tree
    without one."""
    if verity is False:
        raise AssertionError("verity_builder called with verity=False")
    params = VerityParams() if verity is True else verity
    if not params.salt and not params.unsalted:
        params = dataclasses.replace(params, salt=default_salt)
    params.validate()
    return VerityTreeBuilder(params), params


REREAD_PIECE = 4 << 20


def reread(fd: int, size: int, feed: VerityFeed | None, digest: hashlib._Hash | None) -> None:
    """One pass over the finished image for what could not be hashed while writing it.

    Each piece of REREAD_PIECE bytes is mapped from the page cache rather than read: no copy
    into user space (0.126 s against 0.142 s for minbase's 200 MB with both hashes). A
    piece is unmapped when the last hash is done with it (the verity thread may hold a few,
    its queue is bounded), so the mapped memory stays a few pieces whatever the image's
    size. `fd` is the writer's own file, not truncated meanwhile."""
    if size and os.fstat(fd).st_size < size:
        raise CorruptImage("image shorter than written")
    offset = 0
    while offset < size:
        length = min(REREAD_PIECE, size - offset)
        piece = memoryview(mmap.mmap(fd, length, access=mmap.ACCESS_READ, offset=offset))
        if feed is not None:
            feed.observe(offset, piece)
        if digest is not None:
            digest.update(piece)
        offset += length


def append_verity(
    out: BinaryIO, size: int, verity: VerityParams | bool, default_salt: bytes
) -> VerityInfo:
    """Hash the first `size` bytes of the open file and append the tree at `size` (a whole
    number of data blocks); `default_salt` as for `verity_builder`."""
    builder, params = verity_builder(verity, default_salt)
    feed = VerityFeed(builder, params.data_block_size, 0)
    try:
        reread(out.fileno(), size, feed, None)
        end = feed.finish(out.fileno())
    finally:
        feed.close()
    return builder.finish(end // params.data_block_size, out, end)
