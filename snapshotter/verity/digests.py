"""An array of fixed-size digests, in memory while small and in a temp file beyond that.

The leaf level of a 100 GiB blob at 4 KiB blocks is 800 MiB of sha256 digests; the builder
must not hold that in RAM. Entries are written by index in any order (the EROFS converter
hashes its superblock block last) and read back in order when the tree is built. The temp
file is unnamed (O_TMPFILE semantics via TemporaryFile), so nothing is left behind on a crash.
"""

from __future__ import annotations

import os
import tempfile
from typing import IO

#: digests kept in memory before spilling: 64 MiB = 2 Mi sha256 leaves = 8 GiB of 4 KiB data
DEFAULT_MEMORY_LIMIT = 64 << 20


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


class DigestStore:
    def __init__(
        self,
        digest_size: int,
        *,
        memory_limit: int = DEFAULT_MEMORY_LIMIT,
        tmp_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.digest_size = digest_size
        self._memory_limit = memory_limit
        self._tmp_dir = tmp_dir
        self._mem: bytearray | None = bytearray()
        self._file: IO[bytes] | None = None
        self._extent = 0  # bytes covered so far

    @property
    def spilled(self) -> bool:
        return self._file is not None

    def put(self, index: int, digests: bytes | bytearray | memoryview) -> None:
        """Store digests for entries index, index+1, ...; gaps read back as zeros."""
        start = index * self.digest_size
        end = start + len(digests)
        if self._mem is not None and end > self._memory_limit:
            self._spill()
        if self._mem is not None:
            if end > len(self._mem):
                self._mem.extend(bytes(end - len(self._mem)))
            self._mem[start:end] = digests
        else:
            assert self._file is not None
            pwrite_all(self._file.fileno(), digests, start)
        self._extent = max(self._extent, end)

    def read(self, index: int, count: int) -> bytes:
        start = index * self.digest_size
        size = count * self.digest_size
        if self._mem is not None:
            chunk = bytes(self._mem[start : start + size])
        else:
            assert self._file is not None
            chunk = os.pread(self._file.fileno(), size, start)
        if len(chunk) < size:
            chunk += bytes(size - len(chunk))
        return chunk

    def _spill(self) -> None:
        assert self._mem is not None
        # lives until close(), beyond any one block
        self._file = tempfile.TemporaryFile(  # noqa: SIM115
            prefix="verity-digests-", dir=self._tmp_dir
        )
        pwrite_all(self._file.fileno(), self._mem, 0)
        self._mem = None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._mem = bytearray()
        self._extent = 0

    def __enter__(self) -> DigestStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
