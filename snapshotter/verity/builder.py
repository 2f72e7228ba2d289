"""The streaming tree builder: hash data blocks as they pass, in any order, write the tree at
the end.

The EROFS converter writes an image's data blocks in order while it converts, and block 0
(the EROFS superblock) plus the trailing metadata last; it hands each run of blocks to
`hash_blocks` right after writing it, so the data is hashed while it is in cache and never
read a second time. `finish` then writes [superblock +] tree wherever the caller says.

Threads: with the compiled loop (`hashing.ACCELERATED`) `hash_blocks` hashes with the GIL
released, so a converter can hand runs to a background thread and keep converting on its own;
several threads may call `hash_blocks` at once (the hashing runs in parallel, recording the
digests takes a lock). With the pure-Python loop the same calls work but take turns on the GIL.
"""

from __future__ import annotations

import os
import threading
from typing import BinaryIO

from snapshotter.errors import FailedPrecondition, InvalidArgument
from snapshotter.verity.coverage import BlockRanges
from snapshotter.verity.digests import DEFAULT_MEMORY_LIMIT, DigestStore
from snapshotter.verity.geometry import TreeGeometry, tree_start_block
from snapshotter.verity.hashing import hash_run, salted_base
from snapshotter.verity.info import VerityInfo
from snapshotter.verity.params import HASH_TYPE, VerityParams, derive_uuid, uuid_text
from snapshotter.verity.superblock import SUPERBLOCK_SIZE, VeritySuperblock
from snapshotter.verity.tree import write_all, write_levels


class VerityTreeBuilder:
    def __init__(
        self,
        params: VerityParams,
        *,
        memory_limit: int = DEFAULT_MEMORY_LIMIT,
        tmp_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        """`memory_limit` bounds the digests held in RAM (per level); beyond it they go to an
        unnamed temp file in `tmp_dir` (default: the system temp directory)."""
        params.validate()
        self.params = params
        self._base = salted_base(params.hash_name, bytes(params.salt))
        self._digest_size = params.digest_size
        self._memory_limit = memory_limit
        self._tmp_dir = tmp_dir
        self._leaves = DigestStore(self._digest_size, memory_limit=memory_limit, tmp_dir=tmp_dir)
        self._hashed = BlockRanges()
        self._finished = False
        self._lock = threading.RLock()  # the leaf store and the coverage, shared by threads

    def hash_blocks(self, first_block: int, data: bytes | bytearray | memoryview) -> None:
        """Hash whole data blocks starting at block index `first_block`.

        Any order; each block exactly once (a second time is an EpError, it means the caller
        lost track of what it wrote).
        """
        size = memoryview(data).nbytes
        dbs = self.params.data_block_size
        if size % dbs:
            raise InvalidArgument(
                f"verity: {size} bytes at block {first_block} are not whole {dbs}-byte blocks"
            )
        self.add_leaf_digests(first_block, hash_run(self._base, data, dbs))

    def add_leaf_digests(self, first_block: int, digests: bytes) -> None:
        """Record digests H(salt || block) computed elsewhere (e.g. by worker processes)."""
        if first_block < 0:
            raise InvalidArgument(f"verity: negative block index {first_block}")
        if len(digests) % self._digest_size:
            raise InvalidArgument("verity: leaf digests are not whole digests")
        count = len(digests) // self._digest_size
        with self._lock:
            self._check_open()
            self._hashed.add(first_block, first_block + count)
            self._leaves.put(first_block, digests)

    def finish(self, data_blocks: int, out: BinaryIO, hash_offset: int) -> VerityInfo:
        """Write [superblock +] tree into `out` at byte `hash_offset`; return the description.

        `out` is a seekable binary file opened for writing (r+b / w+b); it may be the data file
        itself when `hash_offset` is at or past the end of the data. The builder is spent
        afterwards (its temp storage is released).
        """
        with self._lock:
            return self._finish(data_blocks, out, hash_offset)

    def _finish(self, data_blocks: int, out: BinaryIO, hash_offset: int) -> VerityInfo:
        self._check_open()
        p = self.params
        try:
            if data_blocks < 1:
                raise InvalidArgument("verity: a device needs at least one data block")
            missing = self._hashed.first_missing(data_blocks)
            if missing is not None:
                raise FailedPrecondition(
                    f"verity: data block {missing} of {data_blocks} was never hashed"
                )
            if self._hashed.end > data_blocks:
                raise FailedPrecondition(
                    f"verity: blocks up to {self._hashed.end - 1} were hashed, but the device "
                    f"has only {data_blocks} data blocks"
                )
            start_block = tree_start_block(hash_offset, p.hash_block_size, p.superblock)
            geo = TreeGeometry.compute(data_blocks, p.hash_block_size, self._digest_size)
            tree_start = start_block * p.hash_block_size
            root = write_levels(
                self._leaves,
                geo,
                self._base,
                out,
                tree_start,
                memory_limit=self._memory_limit,
                tmp_dir=self._tmp_dir,
            )
            uuid: bytes | None = None
            if p.superblock:
                uuid = p.uuid or derive_uuid(p.hash_name, root, bytes(p.salt))
                sb = VeritySuperblock(
                    hash_type=HASH_TYPE,
                    uuid=uuid,
                    algorithm=p.hash_name,
                    data_block_size=p.data_block_size,
                    hash_block_size=p.hash_block_size,
                    data_blocks=data_blocks,
                    salt=bytes(p.salt),
                )
                # Zero the gap up to the tree so the hash area is the same whatever the file
                # held before (veritysetup leaves it alone; on a fresh file both are zeros).
                gap = tree_start - hash_offset - SUPERBLOCK_SIZE
                write_all(out, hash_offset, sb.serialize() + bytes(gap))
            out.flush()
        finally:
            self.close()
        return VerityInfo(
            root_hash=root.hex(),
            salt=bytes(p.salt).hex(),
            hash_name=p.hash_name,
            data_block_size=p.data_block_size,
            hash_block_size=p.hash_block_size,
            data_blocks=data_blocks,
            hash_offset=hash_offset,
            superblock=p.superblock,
            uuid=uuid_text(uuid) if uuid is not None else None,
        )

    def close(self) -> None:
        """Release the digest storage; the builder cannot be used afterwards."""
        with self._lock:
            self._finished = True
            self._leaves.close()

    def _check_open(self) -> None:
        if self._finished:
            raise FailedPrecondition("verity: this tree builder is already finished")

    def __enter__(self) -> VerityTreeBuilder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
