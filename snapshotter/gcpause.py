"""The cyclic garbage collector paused while a tree of inodes is built.

A layer's conversion and an fsmeta merge each build a tree with a few tracked objects per
inode (a `Node`, its dicts, its chunk index) and drop almost none of them until the image is
written. CPython's collector starts a pass every 700 allocations of tracked objects, and every
so often a pass over everything allocated so far: it keeps walking a tree that is all live.
Nothing a build makes needs that collector (a tree refers downwards only: hardlinks are
shared nodes, never cycles), so it is paused for the build and resumed after it; a pass then
finds whatever other threads left meanwhile.

The collector is process-wide state: pauses nest and overlap across threads, counted under a
lock; the collector resumes when the last pause ends, and only if it was running when the
first began (a caller that turned it off keeps it off).
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["collector_paused"]

_lock = threading.Lock()
_depth = 0  # pauses in progress, in every thread
_resume = False  # whether the collector ran when the outermost pause began


@contextmanager
def collector_paused() -> Iterator[None]:
    """Within the block, no automatic collection (explicit `gc.collect()` still works)."""
    global _depth, _resume
    with _lock:
        if _depth == 0:
            _resume = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _resume:
                gc.enable()
