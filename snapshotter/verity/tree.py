"""Writing the hash levels above a set of leaf digests, and computing the root.

Bottom-up: level 0 is the leaf digests packed into hash blocks (zero padded at the end of
the level), each level above holds the digests of the blocks below, until one block is left;
its digest is the root. Levels are written at their final positions (top level first on
disk, see geometry) in chunks, so memory stays bounded by the chunk plus the digest stores.
"""

from __future__ import annotations

import os
from typing import BinaryIO

from snapshotter.verity.digests import DEFAULT_MEMORY_LIMIT, DigestStore
from snapshotter.verity.geometry import TreeGeometry
from snapshotter.verity.hashing import SaltedBase, hash_run

#: hash-area bytes handled per step
CHUNK = 4 << 20


def write_all(out: BinaryIO, offset: int, data: bytes | bytearray | memoryview) -> None:
    out.seek(offset)
    view = memoryview(data).cast("B")
    while view:
        n = out.write(view)
        if n is None:  # non-blocking raw file with nothing written; never for regular files
            raise BlockingIOError("write would block")
        view = view[n:]


def write_levels(
    leaves: DigestStore,
    geo: TreeGeometry,
    base: SaltedBase,
    out: BinaryIO,
    tree_start: int,
    *,
    memory_limit: int = DEFAULT_MEMORY_LIMIT,
    tmp_dir: str | os.PathLike[str] | None = None,
) -> bytes:
    """Write every level of the tree at byte `tree_start` of `out`; return the root digest."""
    if geo.levels == 0:
        return leaves.read(0, 1)
    hbs = geo.hash_block_size
    per_block = geo.hashes_per_block
    step = max(1, CHUNK // hbs)
    src = leaves
    made: list[DigestStore] = []
    try:
        for level in range(geo.levels):
            entries = geo.entries(level)
            blocks = geo.level_blocks[level]
            pos = geo.level_offset(level, tree_start)
            dst = DigestStore(geo.digest_size, memory_limit=memory_limit, tmp_dir=tmp_dir)
            made.append(dst)
            for b0 in range(0, blocks, step):
                nb = min(step, blocks - b0)
                e0 = b0 * per_block
                packed = src.read(e0, min(nb * per_block, entries - e0)).ljust(nb * hbs, b"\0")
                write_all(out, pos + b0 * hbs, packed)
                dst.put(b0, hash_run(base, packed, hbs))
            if src is not leaves:
                src.close()  # the level below is written; free it early
            src = dst
        return src.read(0, 1)
    finally:
        for store in made:
            store.close()
