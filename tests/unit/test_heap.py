"""The conversion's buffers kept for reuse (snapshotter.heap).

What the `convert` command and the conversion workers rely on: once the thresholds are set,
the multi-MiB chunks a layer stream hands from its producer thread through a bounded queue
come out of memory the process already has, instead of fresh pages. Page faults are counted
by the kernel (`ru_minflt`), not timed; each run is a fresh interpreter, so the test
process's allocator is left as it was.
"""

from __future__ import annotations

import subprocess
import sys

# A layer stream's pattern (snapshotter/ingest/streams.py): a producer thread per conversion
# makes 4 MiB chunks, at most 4 waiting in a queue, which the consumer drops as it goes.
_CHILD = """
import queue, resource, sys, threading
from snapshotter.heap import keep_freed_buffers

kept = keep_freed_buffers() if sys.argv[1] == "keep" else None

def conversion():
    chunks = queue.Queue(4)
    def produce():
        for _ in range(16):
            chunk = bytearray(4 << 20)
            chunk[::4096] = bytes(1024)  # written, as decompressed output is
            chunks.put(chunk)
        chunks.put(None)
    producer = threading.Thread(target=produce)
    producer.start()
    while chunks.get() is not None:
        pass
    producer.join()

conversion()  # the first one grows the heap
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    conversion()
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(how: str) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, how], capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0], int(out[1])


def test_streamed_chunks_reuse_the_heap_once_kept():
    _, default = _faults("default")
    kept, faults = _faults("keep")
    assert kept == "True"  # glibc took both thresholds
    # 10 conversions x 16 chunks x 1024 pages: the default allocator maps many afresh
    assert default > 10_000, default
    assert faults < default / 100, (faults, default)
