"""Leaf digests of a whole file, hashed over large mmap ranges by threads or worker processes.

With the compiled loop (`hashing.ACCELERATED`), hashing releases the GIL, so threads of this
process hash on every core: one thread per CPU takes ranges of RANGE_BYTES from a shared
counter until none is left, so a core that is busy with other work simply takes fewer ranges,
and no second interpreter starts. Each range is mapped on its own (mmap, then unmapped), so
the memory mapped at once is bounded by threads x RANGE_BYTES whatever the file's size; the
data is hashed where the page cache holds it, never copied.

The pure-Python loop holds the GIL (threads would take turns on one core), so without the
accelerator the file is cut into one contiguous share per CPU instead: the calling process
hashes the first share itself while child interpreters (`python -m snapshotter.verity.worker`)
hash the others, each writing frames `<first_block u64><length u32><digests>` to an unnamed
temp file that the caller reads afterwards. Not a multiprocessing pool: forking a process
that runs gRPC threads (the snapshotter service) is unsafe, and multiprocessing's
spawn/forkserver re-import the caller's `__main__`, which breaks for scripts without a main
guard or code read from stdin.

Either way leaves arrive out of order (consumers accept that). Small inputs are hashed in
the calling thread: starting threads (or interpreters) costs more than it saves.
Speeds: docs/benchmarks.md, "dm-verity format".
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import mmap
import os
import queue
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Literal

from snapshotter.errors import EpError, InvalidArgument
from snapshotter.verity import hashing
from snapshotter.verity.hashing import SaltedBase, hash_run, salted_base

#: data hashed per range (one mmap, one frame of digests)
RANGE_BYTES = 8 << 20
#: below this much data, worker processes are not worth starting
PARALLEL_MIN_BYTES = 64 << 20
#: below this much data, threads are not worth starting (one range is hashed by one thread)
THREAD_MIN_BYTES = 2 * RANGE_BYTES

FRAME = struct.Struct("<QI")

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


def _hash_mapped(fd: int, first_block: int, count: int, block_size: int, base: SaltedBase) -> bytes:
    """Digests of `count` blocks from `first_block` of the file `fd`, read through an mmap."""
    start = first_block * block_size
    aligned = start - start % mmap.ALLOCATIONGRANULARITY
    # Ask for the whole range at once: from a cold cache, page faults alone read the file in
    # small read-around windows, each thread waiting on its own (measured: docs/benchmarks.md).
    os.posix_fadvise(fd, start, count * block_size, os.POSIX_FADV_WILLNEED)
    m = mmap.mmap(fd, start + count * block_size - aligned, access=mmap.ACCESS_READ, offset=aligned)
    try:
        with memoryview(m) as view:
            lo = start - aligned
            return hash_run(base, view[lo : lo + count * block_size], block_size)
    finally:
        # An exception raised inside hash_run (Ctrl-C, the CLI's SIGTERM) keeps a slice of
        # the map alive in its traceback, and closing the map would then fail with a
        # BufferError that hides it; the map is unmapped when that slice goes instead.
        with contextlib.suppress(BufferError):
            m.close()


def _open_checked(path: str, end_block: int, block_size: int) -> IO[bytes]:
    f = open(path, "rb")  # noqa: SIM115 - the callers close it
    if os.fstat(f.fileno()).st_size < end_block * block_size:
        f.close()
        raise InvalidArgument(f"{path} is shorter than {end_block} blocks of {block_size}")
    return f


def hash_file_range(
    path: str, first_block: int, count: int, block_size: int, hash_name: str, salt: bytes
) -> Iterator[tuple[int, bytes]]:
    """Digests of blocks first_block..first_block+count-1 of `path`, one range at a time."""
    if count <= 0:
        return
    base = salted_base(hash_name, salt)
    per_range = max(1, RANGE_BYTES // block_size)
    with _open_checked(path, first_block + count, block_size) as f:
        for b0 in range(first_block, first_block + count, per_range):
            n = min(per_range, first_block + count - b0)
            yield b0, _hash_mapped(f.fileno(), b0, n, block_size, base)


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
    parallel_min_bytes: int | None = None,
    pool: Literal["threads", "processes"] | None = None,
) -> Iterator[tuple[int, bytes]]:
    """Yield (first block, digests) covering blocks 0..data_blocks-1 of `path`, in any order.

    `workers` = threads or processes to use, default the CPUs this process may run on; 1, or
    less data than `parallel_min_bytes` (default THREAD_MIN_BYTES or PARALLEL_MIN_BYTES),
    hashes in the calling thread. `pool`: None picks threads with the compiled loop and
    processes without it (the module doc says why); the tests and the benchmark name one.
    """
    path = os.fspath(path)
    workers = default_workers() if workers is None else workers
    if pool is None:
        accelerated = hashing.ACCELERATED and hash_name in hashing.ACCELERATED_HASHES
        pool = "threads" if accelerated else "processes"
    threaded = pool == "threads"
    if parallel_min_bytes is None:
        parallel_min_bytes = THREAD_MIN_BYTES if threaded else PARALLEL_MIN_BYTES
    if workers <= 1 or data_blocks * block_size < parallel_min_bytes:
        yield from hash_file_range(path, 0, data_blocks, block_size, hash_name, salt)
    elif threaded:
        yield from _from_threads(path, data_blocks, block_size, hash_name, salt, workers)
    else:
        yield from _from_workers(path, data_blocks, block_size, hash_name, salt, workers)


def _from_threads(
    path: str, data_blocks: int, block_size: int, hash_name: str, salt: bytes, workers: int
) -> Iterator[tuple[int, bytes]]:
    """Threads take ranges from a shared counter (`next` on it is atomic under the GIL) and
    put (first block, digests) on a bounded queue; a thread's exception is re-raised here.
    Closing the generator early stops the threads after their current range."""
    per_range = max(1, RANGE_BYTES // block_size)
    ranges = -(-data_blocks // per_range)
    workers = min(workers, ranges)
    base = salted_base(hash_name, salt)
    counter = itertools.count()
    stop = threading.Event()
    results: queue.Queue[tuple[int, bytes] | BaseException | None] = queue.Queue(2 * workers)
    with _open_checked(path, data_blocks, block_size) as f:
        fd = f.fileno()

        def work() -> None:
            try:
                while not stop.is_set() and (i := next(counter)) < ranges:
                    b0 = i * per_range
                    n = min(per_range, data_blocks - b0)
                    results.put((b0, _hash_mapped(fd, b0, n, block_size, base)))
            except BaseException as exc:  # re-raised by the consumer
                results.put(exc)
            finally:
                results.put(None)

        threads = [
            threading.Thread(target=work, name=f"verity-hash-{k}", daemon=True)
            for k in range(workers)
        ]
        for t in threads:
            t.start()
        try:
            running = workers
            while running:
                item = results.get()
                if item is None:
                    running -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            stop.set()
            for t in threads:
                while t.is_alive():  # drain, so a thread blocked on a full queue can finish
                    with contextlib.suppress(queue.Empty):
                        while True:
                            results.get_nowait()
                    t.join(0.01)


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
