"""glibc's allocator told to keep and reuse the buffers a conversion streams through.

A layer streams through buffers of a few MiB: each decompressed chunk (`streams.OUT_LIMIT`),
each piece of the image read back for its digest. glibc serves any request above its mmap
threshold (128 KiB at first, raised on the fly only up to the size of the last one freed)
with a fresh mapping and unmaps it on free, and it returns the top of its heap to the kernel
once more than the trim threshold is free there; either way the next chunk lands on fresh
pages, a page fault each. Where the kernel's free pages are handed back to a hypervisor
(free page reporting, as on this project's VM hosts) a fresh page costs far more than its
zeroing: minbase's `.tar.gz` with verity converted in 0.87 to 0.93x the time with the buffers kept
(docs/benchmarks.md). A 32 MiB mmap threshold and a 256 MiB trim threshold keep a
conversion's working set (its bounded queues of chunks) in the heap, reused chunk after
chunk.

Process-wide, so called only by processes whose job is conversion: the `convert` command
and the service's conversion workers. Elsewhere (not glibc) it does nothing.
"""

from __future__ import annotations

__all__ = ["keep_freed_buffers"]

_M_TRIM_THRESHOLD = -1  # <malloc.h>
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's ceiling for it on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 256 << 20


def keep_freed_buffers() -> bool:
    """Set both thresholds; True if the allocator took them."""
    try:
        import ctypes  # the conversion imports it anyway (DataWriter's sync_file_range)

        mallopt = ctypes.CDLL(None).mallopt
    except (ImportError, OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    mmap_ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    return mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and mmap_ok
