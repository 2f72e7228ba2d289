"""Layer byte streams: detect tar / tar+gzip / tar+zstd by magic, decompress in bounded
memory, and hash both sides while the bytes pass (the blob digest of what was read, the diffID
of the tar that came out).

gzip goes through ISA-L (`isal`), faster than zlib (docs/benchmarks.md); zstd through
`zstandard`. Decompressor output is bounded per call: gzip by `max_length`, zstd by feeding it
small pieces of input (a zstd block inflates at most ~32768:1), so a hostile or a merely very
sparse layer cannot balloon memory.
"""

from __future__ import annotations

import hashlib
from typing import Protocol, cast

import zstandard
from isal import isal_zlib

from snapshotter.erofs.limits import DEFAULT_LIMITS, Limits
from snapshotter.errors import InvalidInput

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
READ_CHUNK = 1 << 20
ZSTD_FEED = 2048  # bytes of zstd input per call: at most ~64 MiB of output
GZIP_FEED = 1 << 14  # first piece of gzip input per member (max_length bounds its output)
OUT_LIMIT = 4 << 20

# isal's stub declares `error` an instance (`error: Exception`); at run time it is the class.
_GZIP_ERROR = cast("type[Exception]", isal_zlib.error)


class ByteReader(Protocol):
    """What a layer is read from: a file, a socket's reader, a progress-counting wrapper."""

    def read(self, size: int = -1, /) -> bytes: ...


class _Decoder(Protocol):
    def feed(self, data: bytes) -> bytes: ...
    def pending(self) -> bool: ...
    def drain(self) -> bytes: ...
    def finish(self) -> None: ...


class _Identity:
    def feed(self, data: bytes) -> bytes:
        return data

    def pending(self) -> bool:
        return False

    def drain(self) -> bytes:
        return b""

    def finish(self) -> None:
        pass


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


class _Zstd:
    def __init__(self) -> None:
        self._dctx = zstandard.ZstdDecompressor()
        self._obj = self._dctx.decompressobj()
        self._tail = b""
        self._pos = 0  # start of the input not yet consumed in _tail
        self._between_frames = False

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
            piece = tail[self._pos : self._pos + ZSTD_FEED]
            self._pos += len(piece)
            if self._between_frames:
                if not piece.strip(b"\0"):
                    continue
                self._obj = self._dctx.decompressobj()
                self._between_frames = False
            try:
                chunk = self._obj.decompress(piece)
            except zstandard.ZstdError as exc:
                raise InvalidInput(f"corrupt zstd data: {exc}") from None
            out.append(chunk)
            size += len(chunk)
            if self._obj.eof:
                self._between_frames = True
                self._pos -= len(self._obj.unused_data)  # the next frame starts there
        return b"".join(out)

    def finish(self) -> None:
        if not self._between_frames:
            raise InvalidInput("truncated zstd data: the stream ends inside a frame")


class LayerStream:
    """A readable tar stream out of a (possibly compressed) layer, hashed as it passes.

    `compressed_digest` is the sha256 of the bytes read from the source (the OCI blob digest);
    `diff_id` the sha256 of the tar (the OCI diffID). Both are complete after `drain()`.
    More than `limits.max_tar_bytes` of tar (a decompression bomb) is an EpError.
    """

    def __init__(self, source: ByteReader, limits: Limits = DEFAULT_LIMITS) -> None:
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
        self._blob_hash = hashlib.sha256()
        self._tar_hash = hashlib.sha256()
        self._buf = b""  # decompressed bytes not yet read, from _pos on
        self._pos = 0
        self._src_done = False
        self.tar_size = 0
        self._push(head)

    def _push(self, raw: bytes) -> None:
        if not raw:
            self._src_done = True
            self._decoder.finish()
            return
        self._blob_hash.update(raw)
        self._emit(self._decoder.feed(raw))

    def _emit(self, out: bytes) -> None:
        if out:
            self._tar_hash.update(out)
            self.tar_size += len(out)
            if self.tar_size > self._max_tar_bytes:
                raise InvalidInput(
                    f"layer decompresses to more than {self._max_tar_bytes} bytes (max_tar_bytes)"
                )
            self._buf = self._buf[self._pos :] + out if self._pos < len(self._buf) else out
            self._pos = 0

    def _fill(self) -> bool:
        """Produce more tar bytes; False at the end of the stream."""
        while True:
            if self._decoder.pending():
                self._emit(self._decoder.drain())
                return True
            if self._src_done:
                return False
            before = self.tar_size
            self._push(self._src.read(READ_CHUNK))
            if self.tar_size != before:
                return True

    def read(self, size: int = -1) -> bytes:
        """Up to `size` tar bytes (fewer only at the end); `size < 0` reads the rest."""
        pos = self._pos
        end = pos + size
        if size >= 0 and end <= len(self._buf):  # the common case: already decompressed
            self._pos = end
            return self._buf[pos:end]
        if size < 0:  # pieces joined once: appending to the buffer would be quadratic
            parts = [self._buf[self._pos :]]
            self._buf, self._pos = b"", 0
            while self._fill():
                parts.append(self._buf)
                self._buf = b""
            return b"".join(parts)
        while len(self._buf) - self._pos < size and self._fill():
            pass
        out = self._buf[self._pos : self._pos + size]
        self._pos += len(out)
        return out

    def drain(self) -> int:
        """Read (and hash) the rest of the stream; returns how many tar bytes were left."""
        left = len(self._buf) - self._pos
        self._buf, self._pos = b"", 0
        while self._fill():
            left += len(self._buf)
            self._buf, self._pos = b"", 0
        return left

    @property
    def diff_id(self) -> str:
        return "sha256:" + self._tar_hash.hexdigest()

    @property
    def compressed_digest(self) -> str:
        return "sha256:" + self._blob_hash.hexdigest()
