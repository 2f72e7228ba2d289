"""Format-1 block hashing: digest = H(salt || block), for a run of equal-sized blocks.

The salt is hashed once into a base context that each block copies; that and slicing a
memoryview (no copies of the data) is the fastest pure-Python loop we measured (its speed:
docs/benchmarks.md, "dm-verity format").
"""

from __future__ import annotations

import hashlib
from typing import Any


def salted_base(hash_name: str, salt: bytes) -> Any:
    """A hash context with the salt already fed in; copy it for each block."""
    base = hashlib.new(hash_name)
    base.update(salt)
    return base


def hash_run(base: Any, data: bytes | bytearray | memoryview, block_size: int) -> bytes:
    """The concatenated digests of the whole blocks in `data` (its length is a multiple)."""
    view = memoryview(data).cast("B")
    copy = base.copy
    out = bytearray()
    for off in range(0, len(view), block_size):
        h = copy()
        h.update(view[off : off + block_size])
        out += h.digest()
    return bytes(out)
