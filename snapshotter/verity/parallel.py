"""Leaf digests of a whole file, hashed by worker processes over large mmap ranges.

One thread hashing 4 KiB blocks of an mmap is bound by one core; threads make it slower (the GIL
changes hands every block); one process per core, each over its own contiguous share of the
file, scales with the cores (docs/benchmarks.md, "dm-verity format").

The file is cut into one contiguous share per CPU; the calling process hashes the first
share itself while child interpreters (`python -m snapshotter.verity.worker`) hash the
others, each writing frames `<first_block u64><length u32><digests>` to an unnamed temp
file that the caller reads afterwards (leaves arrive out of order; consumers accept that).
Not a multiprocessing pool: forking a process that runs gRPC threads (the snapshotter
service) is unsafe, and multiprocessing's spawn/forkserver re-import the caller's
`__main__`, which breaks for scripts without a main guard or code read from stdin.

Small inputs are hashed in the calling process: starting worker interpreters costs more
than it saves.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from snapshotter.errors import EpError, InvalidArgument
from snapshotter.verity.hashing import hash_run, salted_base

#: data hashed per frame
RANGE_BYTES = 32 << 20
#: below this much data, hash in the calling process
PARALLEL_MIN_BYTES = 64 << 20

FRAME = struct.Struct("<QI")

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


def hash_file_range(
    path: str, first_block: int, count: int, block_size: int, hash_name: str, salt: bytes
) -> Iterator[tuple[int, bytes]]:
    """Digests of blocks first_block..first_block+count-1 of `path`, one frame at a time."""
    if count <= 0:
        return
    start = first_block * block_size
    aligned = start - start % mmap.ALLOCATIONGRANULARITY
    length = start + count * block_size - aligned
    base = salted_base(hash_name, salt)
    per_range = max(1, RANGE_BYTES // block_size)
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size < start + count * block_size:
            raise InvalidArgument(
                f"{path} is shorter than {first_block + count} blocks of {block_size}"
            )
        m = mmap.mmap(f.fileno(), length, access=mmap.ACCESS_READ, offset=aligned)
        try:
            with memoryview(m) as view:
                for b0 in range(0, count, per_range):
                    n = min(per_range, count - b0)
                    lo = start - aligned + b0 * block_size
                    yield (
                        first_block + b0,
                        hash_run(base, view[lo : lo + n * block_size], block_size),
                    )
        finally:
            # An exception raised inside hash_run (Ctrl-C, the CLI's SIGTERM) keeps slices of
            # the map alive in its traceback, and closing the map would then fail with a
            # BufferError that hides it; the map is unmapped when those slices go instead.
            with contextlib.suppress(BufferError):
                m.close()


def default_workers() -> int:
    return len(os.sched_getaffinity(0))


def file_leaf_digests(
    path: str | os.PathLike[str],
    data_blocks: int,
    block_size: int,
    hash_name: str,
    salt: bytes,
    *,
    workers: int | None = None,
    parallel_min_bytes: int = PARALLEL_MIN_BYTES,
) -> Iterator[tuple[int, bytes]]:
    """Yield (first block, digests) covering blocks 0..data_blocks-1 of `path`, in any order.

    `workers` = processes to use (default: the CPUs this process may run on); 1, or less
    data than `parallel_min_bytes`, hashes in the calling process.
    """
    path = os.fspath(path)
    workers = default_workers() if workers is None else workers
    if workers <= 1 or data_blocks * block_size < parallel_min_bytes:
        yield from hash_file_range(path, 0, data_blocks, block_size, hash_name, salt)
        return
    yield from _from_workers(path, data_blocks, block_size, hash_name, salt, workers)


def _from_workers(
    path: str, data_blocks: int, block_size: int, hash_name: str, salt: bytes, workers: int
) -> Iterator[tuple[int, bytes]]:
    per_range = max(1, RANGE_BYTES // block_size)
    ranges = -(-data_blocks // per_range)
    workers = min(workers, ranges)
    # contiguous shares, split on frame boundaries; share 0 is hashed by this process
    shares = [
        (
            ranges * k // workers * per_range,
            min(data_blocks, ranges * (k + 1) // workers * per_range),
        )
        for k in range(workers)
    ]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
    procs: list[tuple[subprocess.Popen[bytes], IO[bytes], IO[bytes]]] = []
    try:
        for lo, hi in shares[1:]:
            # Frames go to an unnamed file, not a pipe: a full pipe would stall the worker
            # while this process is busy hashing its own share.
            out: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 - closed in finally
            err: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 - closed in finally
            procs.append(
                (
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "snapshotter.verity.worker",
                            path,
                            str(lo),
                            str(hi - lo),
                            str(block_size),
                            hash_name,
                            salt.hex() or "-",
                        ],
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=err,
                        env=env,
                    ),
                    out,
                    err,
                )
            )
        yield from hash_file_range(path, 0, shares[0][1], block_size, hash_name, salt)
        digest_size = hashlib.new(hash_name).digest_size
        for (lo, hi), (proc, out, err) in zip(shares[1:], procs, strict=True):
            if proc.wait() != 0:
                err.seek(0)
                lines = err.read().decode(errors="replace").strip().splitlines()
                raise EpError(f"verity worker failed: {lines[-1] if lines else proc.returncode}")
            out.seek(0)
            got = 0
            while header := out.read(FRAME.size):
                first, size = FRAME.unpack(header) if len(header) == FRAME.size else (0, -1)
                digests = out.read(size) if size >= 0 else b""
                if size < 0 or len(digests) != size:
                    raise EpError("verity worker wrote a torn frame")
                got += size
                yield first, digests
            if got != (hi - lo) * digest_size:
                raise EpError("verity worker returned incomplete digests")
    finally:
        for proc, out, err in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            out.close()
            err.close()
