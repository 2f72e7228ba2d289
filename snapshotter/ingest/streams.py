"""Layer byte streams: detect tar / tar+gzip / tar+zstd by magic, decompress in bounded
memory, and hash both sides while the bytes pass (the blob digest of what was read, the diffID
of the tar that came out).

gzip goes through ISA-L (`isal`), faster than zlib (docs/benchmarks.md); zstd through
`zstandard`. Decompressor output is bounded per chunk: gzip's by `max_length`, zstd's by the
size of the chunk it decompresses into (`stream_reader.read`), so a hostile or a merely very
sparse layer (a zstd block of a few input bytes may hold 128 KiB: ~32768:1) cannot balloon
memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import queue
import sys
import threading
from collections.abc import Iterator
from typing import IO, Protocol, cast

from isal import isal_zlib

from snapshotter.erofs.limits import DEFAULT_LIMITS, Limits
from snapshotter.errors import InvalidInput

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
READ_CHUNK = 1 << 20
GZIP_FEED = 1 << 14  # first piece of gzip input per member (max_length bounds its output)
OUT_LIMIT = 4 << 20
QUEUE_DEPTH = 4  # chunks of at most OUT_LIMIT between the producer thread and the reader
HASH_DEPTH = 8  # compressed layers: blob and tar chunks waiting for the digests' thread

# isal's stub declares `error` an instance (`error: Exception`); at run time it is the class.
_GZIP_ERROR = cast("type[Exception]", isal_zlib.error)


class ByteReader(Protocol):
    """What a layer is read from: a file, a socket's reader, a progress-counting wrapper."""

    def read(self, size: int = -1, /) -> bytes: ...


class _Decoder(Protocol):
    def decode(self, raw: Iterator[bytes]) -> Iterator[bytes]:
        """The tar out of the layer's chunks `raw`: non-empty chunks of at most OUT_LIMIT
        bytes; a corrupt or truncated layer is an EpError, raised where it shows."""
        ...


class _Identity:
    def decode(self, raw: Iterator[bytes]) -> Iterator[bytes]:
        return raw


class _Gzip:
    """Multi-member gzip; each call returns at most OUT_LIMIT bytes.

    Input goes to the decompressor in pieces from an offset into the pending bytes; a piece
    starts at GZIP_FEED after each member's end and doubles while a member goes on. The
    decompressor copies the input left after a member's end, so a layer of thousands of tiny
    members per MiB (a bomb of a different kind) costs a small piece per member, not the
    rest of the input each time, while one large member is fed in big pieces."""

    def __init__(self) -> None:
        self._obj = isal_zlib.decompressobj(31)
        self._tail = b""
        self._pos = 0  # start of the input not yet consumed in _tail
        self._between_members = False
        self._piece = GZIP_FEED

    def decode(self, raw: Iterator[bytes]) -> Iterator[bytes]:
        for data in raw:
            out = self.feed(data)
            while True:
                if out:
                    yield out
                if not self.pending():
                    break
                out = self.drain()
        self.finish()

    def feed(self, data: bytes) -> bytes:
        self._tail = self._tail[self._pos :] + data if self.pending() else data
        self._pos = 0
        return self.drain()

    def pending(self) -> bool:
        return self._pos < len(self._tail)

    def drain(self) -> bytes:
        out = []
        size = 0
        tail = self._tail
        while self._pos < len(tail) and size < OUT_LIMIT:
            if self._between_members:
                if tail[self._pos] == 0:  # zero padding after the last member
                    if tail[self._pos :].strip(b"\0"):
                        raise InvalidInput("corrupt gzip data: garbage after a gzip member")
                    self._pos = len(tail)
                    break
                self._obj = isal_zlib.decompressobj(31)
                self._between_members = False
            piece = tail[self._pos : self._pos + self._piece]
            try:
                chunk = self._obj.decompress(piece, OUT_LIMIT - size)
            except _GZIP_ERROR as exc:
                raise InvalidInput(f"corrupt gzip data: {exc}") from None
            out.append(chunk)
            size += len(chunk)
            if self._obj.eof:
                self._pos += len(piece) - len(self._obj.unused_data)
                self._between_members = True
                self._piece = GZIP_FEED
            else:
                self._pos += len(piece) - len(self._obj.unconsumed_tail)
                self._piece = min(2 * self._piece, READ_CHUNK)
        return b"".join(out)

    def finish(self) -> None:
        if not self._between_members:
            raise InvalidInput("truncated gzip data: the stream ends before its end marker")


_BLOCK_MAX = 128 << 10  # zstd's Block_Maximum_Size: no block holds more


class _ZstdFrames:
    """Where zstd's frames and blocks start and end, read from their headers as the bytes
    pass (RFC 8878: frame header, 3-byte block headers, optional checksum; skippable
    frames): `advance` says how far the input may go to the decompressor before a frame
    ends, so that what lies between frames is seen here first. Zero bytes between frames
    are padding; `bad` is set at a header zstd itself refuses (the decompressor gets those
    bytes and says why)."""

    def __init__(self) -> None:
        self.between = True  # before a frame's first byte (zero padding may come)
        self.bad = False
        self._head = bytearray()  # the header being read
        self._want = 4  # the bytes of _head that complete it
        self._state = "magic"  # magic, frame, block, data, checksum, skip
        self._left = 0  # data/skip/checksum bytes left
        self._last = False  # the current block is the frame's last
        self._checksum = False

    def advance(self, data: memoryview, pos: int) -> int:
        """From `pos`, the end of what may go to the decompressor: the end of `data`, or of
        the frame that ends first."""
        end = len(data)
        while True:
            if self._state == "block" and not self._head:
                # Whole block headers in `data` (nearly all of them), read in place: the
                # blocks of a frame pass in a few steps each, not through `_header`.
                while end - pos >= 3:
                    header = int.from_bytes(data[pos : pos + 3], "little")
                    kind, size = (header >> 1) & 3, header >> 3
                    if kind == 3 or size > _BLOCK_MAX:
                        break  # refused below, by `_header`
                    body = 1 if kind == 1 else size
                    if header & 1 or end - pos < 3 + body:  # the last, or past `data`
                        pos += 3
                        self._last = bool(header & 1)
                        self._state, self._left = "data", body
                        break
                    pos += 3 + body
            if self._state in ("data", "skip", "checksum"):  # (an empty block ends at once)
                step = min(self._left, end - pos)
                pos += step
                self._left -= step
                if self._left:
                    break
                if self._state == "data" and not self._last:
                    self._next("block", 3)
                    continue
                if self._state == "data" and self._checksum:
                    self._state, self._left = "checksum", 4
                    continue
                self.between = True  # the frame (or skippable frame) ends here
                self._next("magic", 4)
                return pos
            if pos >= end:
                break
            if self._state == "magic":
                self.between = False  # a frame's first byte: no more padding
            take = min(self._want - len(self._head), end - pos)
            self._head += data[pos : pos + take]
            pos += take
            if len(self._head) < self._want:
                break
            if not self._header():
                self.bad = True
                return pos
        return pos

    def _next(self, state: str, want: int) -> None:
        self._state, self._want = state, want
        self._head.clear()

    def _header(self) -> bool:
        """A complete header is in _head: the state after it; False if zstd would refuse it."""
        head = self._head
        if self._state == "magic":
            if head[1:4] == b"\x2a\x4d\x18" and head[0] & 0xF0 == 0x50:
                self._state, self._want = "skiplen", 8
                return True
            if bytes(head) != ZSTD_MAGIC:
                return False
            self._state, self._want = "frame", 5
            return True
        if self._state == "skiplen":
            self._state, self._left = "skip", int.from_bytes(head[4:8], "little")
            self._head.clear()
            return True
        if self._state == "frame":
            fhd = head[4]
            if len(head) == 5:
                if fhd & 0x08:  # the reserved bit
                    return False
                single = fhd & 0x20
                self._checksum = bool(fhd & 0x04)
                self._want = (
                    5
                    + (0 if single else 1)
                    + (0, 1, 2, 4)[fhd & 3]
                    + ((1 if single else 0), 2, 4, 8)[fhd >> 6]
                )
                if self._want > 5:
                    return True
            self._next("block", 3)
            return True
        # a block header
        header = int.from_bytes(head, "little")
        kind, size = (header >> 1) & 3, header >> 3
        if kind == 3 or size > _BLOCK_MAX:
            return False
        self._last = bool(header & 1)
        self._state, self._left = "data", 1 if kind == 1 else size
        self._head.clear()
        return True


class _ZstdInput:
    """What the decompressor reads (`read`, as a file): the layer's chunks, cut where
    `_ZstdFrames` finds a frame's end, with the zero padding between frames left out
    (zstd itself refuses it); memoryview slices of the chunks, no copies."""

    def __init__(self, raw: Iterator[bytes]) -> None:
        self._raw = raw
        self._frames = _ZstdFrames()
        self._chunk = memoryview(b"")
        self._pos = 0  # start of the input not yet given out in _chunk

    def read(self, size: int) -> memoryview | bytes:
        """Between 1 and `size` bytes of frames; b"" at the end of the layer (or for
        `size` 0, as a file gives)."""
        if size <= 0:
            return b""
        frames = self._frames
        while True:
            if frames.bad:  # zstd had the header and did not refuse it
                raise InvalidInput("corrupt zstd data: a frame or block header zstd refuses")
            chunk, pos = self._chunk, self._pos
            if pos >= len(chunk):
                more = next(self._raw, None)
                if more is None:
                    return b""
                self._chunk, self._pos = memoryview(more), 0
                continue
            if frames.between:
                rest = bytes(chunk[pos : pos + 4096]).lstrip(b"\0")
                self._pos = min(len(chunk), pos + 4096) - len(rest)
                if not rest:  # zero padding between frames is skipped
                    continue
                pos = self._pos
            self._pos = frames.advance(chunk[: pos + size], pos)
            if self._pos > pos:  # (else a frame ended at `pos`: what follows it is next)
                return chunk[pos : self._pos]

    def finish(self) -> None:
        """After the decompressor's end: the layer must have ended, between frames."""
        if not self._frames.between:
            raise InvalidInput("truncated zstd data: the stream ends inside a frame")
        if self._pos < len(self._chunk) or next(self._raw, None) is not None:
            raise InvalidInput("corrupt zstd data: the decompressor stopped before the end")


class _Zstd:
    """Concatenated zstd frames (zero padding between them allowed), decompressed straight
    into each output chunk (`stream_reader.read`: no copy out of zstandard's own buffer,
    which `decompressobj` makes; minbase's `.tar.zst` 0.92x, docs/benchmarks.md). The input
    reaches zstd through `_ZstdInput`: frames end where their headers say (a stream that
    ends inside one is truncated, which the reader itself would not say), and whatever
    else follows a frame is refused by zstd as a frame."""

    def __init__(self) -> None:
        # Imported here: a plain tar (the mmap path) or a gzip layer does not need zstandard,
        # whose import (it loads `platform`) cost every `convert` ~3 ms of start-up
        # (docs/benchmarks.md, "CLI start-up").
        import zstandard

        self._error: type[Exception] = zstandard.ZstdError
        self._dctx = zstandard.ZstdDecompressor()

    def decode(self, raw: Iterator[bytes]) -> Iterator[bytes]:
        source = _ZstdInput(raw)
        reader = self._dctx.stream_reader(
            cast("IO[bytes]", source),  # (it calls only `read`)
            read_size=READ_CHUNK,
            read_across_frames=True,
            closefd=False,
        )
        while True:
            try:
                out = reader.read(OUT_LIMIT)
            except self._error as exc:
                raise InvalidInput(f"corrupt zstd data: {exc}") from None
            if not out:
                break
            yield out
        source.finish()


class _Stopped(Exception):
    """The consumer closed the stream: the producer thread ends quietly."""


_END = object()


class LayerStream:
    """A readable tar stream out of a (possibly compressed) layer, hashed as it passes.

    `compressed_digest` is the sha256 of the bytes read from the source (the OCI blob digest;
    None with `source_digest=False`, for a caller that never reads it: ~40 ms of CPU for
    minbase's 85 MB `.tar.zst`); `diff_id` the sha256 of the tar (the OCI diffID); for an
    uncompressed layer they are the same stream, hashed once. Both are complete after
    `drain()`. More than `limits.max_tar_bytes` of tar (a decompression bomb) is an EpError.

    Reading the source and decompressing run in a producer thread, and for a compressed
    layer both sha256s in a thread of their own fed by the producer (`os.read`, ISA-L, zstd
    and hashlib release the GIL), so they overlap with the tar parsing and image writing of
    the caller's thread on a second core. The tar reaches the caller through a
    queue of at most QUEUE_DEPTH chunks of at most OUT_LIMIT bytes: memory stays bounded
    whatever the layer's size. An error in the producer (corrupt, truncated, over a limit, an
    OSError of the source) is raised, as it was raised there, by the read that reaches the
    point of the stream where it happened, so errors arrive in stream order whatever the
    threads' timing. `close()` (or the `with` block) stops the producer; no thread outlives it.

    `read` returns exactly the bytes asked for (fewer only at the end); `read_some` returns
    up to that many without joining chunks (zero-copy memoryview slices of the producer's
    chunks, valid as long as the caller keeps them).
    """

    def __init__(
        self, source: ByteReader, limits: Limits = DEFAULT_LIMITS, *, source_digest: bool = True
    ) -> None:
        self._src = source
        self._max_tar_bytes = limits.max_tar_bytes
        head = source.read(READ_CHUNK)
        self.compression = (
            "gzip"
            if head.startswith(GZIP_MAGIC)
            else "zstd"
            if head.startswith(ZSTD_MAGIC)
            else "none"
        )
        decoders: dict[str, type[_Decoder]] = {"gzip": _Gzip, "zstd": _Zstd, "none": _Identity}
        self._decoder = decoders[self.compression]()
        self._tar_hash = hashlib.sha256()
        # Uncompressed: the blob is the tar, one hash serves both digests.
        self._blob_hash = (
            self._tar_hash
            if self.compression == "none"
            else hashlib.sha256()
            if source_digest
            else None
        )
        self.tar_size = 0  # tar bytes produced so far (the producer's count)
        # Compressed: the blob's (False) and the tar's (True) chunks for the digests' thread.
        self._digests: queue.Queue[tuple[bool, bytes] | None] | None = (
            None if self.compression == "none" else queue.Queue(HASH_DEPTH)
        )
        self._chunk = memoryview(b"")  # the chunk being read, from _pos on
        self._pos = 0
        self._done = False  # the producer's end (or error) was taken from the queue
        self._queue: queue.Queue[object] = queue.Queue(QUEUE_DEPTH)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._produce, args=(head,), name="layer-stream", daemon=True
        )
        self._thread.start()

    def __enter__(self) -> LayerStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the producer and wait for it; the digests are final only after `drain()`."""
        self._stop.set()
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):  # unblock a producer waiting for room
                self._queue.get(timeout=0.05)
        self._thread.join()
        self._done = True

    # The producer thread.

    def _put(self, item: object) -> None:
        while True:
            if self._stop.is_set():
                raise _Stopped
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _hash_chunks(self, chunks: queue.Queue[tuple[bool, bytes] | None]) -> None:
        """The digests' thread (compressed layers): sha256 of the blob's and of the tar's
        chunks (`True`: a tar chunk), each in order."""
        tar, blob = self._tar_hash.update, (self._blob_hash or self._tar_hash).update
        while (item := chunks.get()) is not None:
            (tar if item[0] else blob)(item[1])

    def _produce(self, raw: bytes) -> None:
        digests = self._digests
        hasher: threading.Thread | None = None
        if digests is not None:
            # Both sha256s (the diffID's ~40% of the producer's CPU for zstd, the blob's
            # ~15%) in a thread of their own: hashlib releases the GIL, so they overlap the
            # decompression and take the core the parser leaves idle while it waits for the
            # producer (docs/benchmarks.md).
            hasher = threading.Thread(
                target=self._hash_chunks, args=(digests,), name="layer-diffid", daemon=True
            )
            hasher.start()
        try:
            self._produce_chunks(raw, hasher)
        finally:
            if hasher is not None and hasher.is_alive():  # stopped or failed midway
                assert digests is not None
                digests.put(None)  # (the hasher always drains: no deadlock)
                hasher.join()

    def _produce_chunks(self, raw: bytes, hasher: threading.Thread | None) -> None:
        try:
            decoder, digests = self._decoder, self._digests
            # None for an uncompressed layer (no digests queue) or without a blob digest
            hash_source = digests if self._blob_hash is not None else None
            for out in decoder.decode(self._raw_chunks(raw, hash_source)):
                self._emit(out)
            if hasher is not None and digests is not None:  # the diffID is complete
                digests.put(None)  # before the consumer sees the end
                hasher.join()
            self._put(_END)
        except _Stopped:
            return
        except BaseException as exc:  # handed to the consumer, raised there
            with contextlib.suppress(_Stopped):
                self._put(exc)

    def _raw_chunks(
        self, raw: bytes, hash_source: queue.Queue[tuple[bool, bytes] | None] | None
    ) -> Iterator[bytes]:
        """The source's chunks, `raw` (its head) first, each handed to the blob's digest."""
        while raw:
            if hash_source is not None:
                hash_source.put((False, raw))
            yield raw
            raw = self._src.read(READ_CHUNK)

    def _emit(self, out: bytes) -> None:
        if out:
            if self._digests is not None:
                self._digests.put((True, out))
            else:
                self._tar_hash.update(out)
            self.tar_size += len(out)
            if self.tar_size > self._max_tar_bytes:
                raise InvalidInput(
                    f"layer decompresses to more than {self._max_tar_bytes} bytes (max_tar_bytes)"
                )
            self._put(out)

    # The consumer side.

    def _next_chunk(self) -> bool:
        """Take the next chunk from the producer; False at the end of the stream."""
        if self._done:
            return False
        item = self._queue.get()
        if item is _END:
            self._done = True
            self._thread.join()
            return False
        if isinstance(item, BaseException):
            self._done = True
            self._thread.join()
            raise item
        self._chunk = memoryview(cast("bytes", item))
        self._pos = 0
        return True

    def read_some(self, size: int) -> memoryview | bytes:
        """Between 1 and `size` tar bytes (b"" only at the end), without a copy."""
        pos = self._pos
        if pos >= len(self._chunk):
            if size <= 0 or not self._next_chunk():
                return b""
            pos = 0
        end = min(pos + size, len(self._chunk))
        self._pos = end
        return self._chunk[pos:end]

    def read(self, size: int = -1) -> memoryview | bytes:
        """`size` tar bytes (fewer only at the end); `size < 0` reads the rest."""
        if size < 0:
            size = sys.maxsize
        pos = self._pos
        if pos + size <= len(self._chunk):  # the common case: within the current chunk
            self._pos = pos + size
            return self._chunk[pos : pos + size]
        parts: list[memoryview | bytes] = []
        got = 0
        while got < size:
            piece = self.read_some(size - got)
            if not piece:
                break
            parts.append(piece)
            got += len(piece)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def view_ahead(self) -> tuple[memoryview, int]:
        """The rest of the current chunk (the next one taken at its end), and where the next
        byte is in it; empty at the end of the stream."""
        if self._pos >= len(self._chunk) and not self._next_chunk():
            return memoryview(b""), 0
        return self._chunk, self._pos

    def consume(self, size: int) -> None:
        """Pass over `size` bytes of what `view_ahead` gave."""
        self._pos += size

    def skip(self, size: int) -> int:
        """Pass over `size` tar bytes (hashed all the same); returns how many there were."""
        left = size
        while left > 0:
            piece = self.read_some(left)
            if not piece:
                break
            left -= len(piece)
        return size - left

    def drain(self) -> int:
        """Read (and hash) the rest of the stream; returns how many tar bytes were left."""
        left = len(self._chunk) - self._pos
        self._chunk, self._pos = memoryview(b""), 0
        while self._next_chunk():
            left += len(self._chunk)
            self._chunk, self._pos = memoryview(b""), 0
        return left

    @property
    def diff_id(self) -> str:
        return "sha256:" + self._tar_hash.hexdigest()

    @property
    def compressed_digest(self) -> str | None:
        return None if self._blob_hash is None else "sha256:" + self._blob_hash.hexdigest()
