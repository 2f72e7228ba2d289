"""The conversion's buffers kept for reuse (snapshotter.heap).

What the `convert` command and the conversion workers rely on: once the thresholds are set,
multi-MiB buffers a conversion frees are kept by the allocator and the next ones reuse them,
where by default glibc hands them back to the kernel and the next ones are fresh pages.
Page faults are counted by the kernel (`ru_minflt`), not timed; each run is a fresh
interpreter, so the test process's allocator is left as it was.
"""

from __future__ import annotations

import subprocess
import sys

# A burst of a stream's chunks (4 MiB, as `streams.OUT_LIMIT`), all alive at once as a full
# queue and its consumers hold them, then all freed, again and again. One thread: one
# malloc arena, so the count does not depend on which arena a new thread is given.
_CHILD = """
import resource, sys
from snapshotter.heap import keep_freed_buffers

kept = keep_freed_buffers() if sys.argv[1] == "keep" else None

def burst():
    chunks = [bytearray(4 << 20) for _ in range(8)]
    for chunk in chunks:
        chunk[::4096] = bytes(1024)  # written, as decompressed output is

burst()  # the first one grows the heap
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(int(sys.argv[2])):
    burst()
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

BURSTS = 20
BURST_PAGES = 8 * (4 << 20) // 4096


def _faults(how: str) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, how, str(BURSTS)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return out[0], int(out[1])


def test_freed_chunks_are_kept_and_reused():
    _, default = _faults("default")
    kept, faults = _faults("keep")
    assert kept == "True"  # glibc took both thresholds
    # by default every burst after the first faults its 32 MiB in afresh (trimmed on free)
    assert default > BURSTS * BURST_PAGES // 2, default
    assert faults < BURST_PAGES // 4, (faults, default)  # kept: reused, no burst's worth
