"""Where each part of a dm-verity hash area lies (cryptsetup's `hash_levels`, in bytes).

Level 0 holds one digest per data block, level i+1 one digest per hash block of level i, up
to the first level that fits in one hash block; the root hash is the digest of that block.
On disk the levels are stored top level first, leaf level last, starting at the tree start.
With one data block there is no tree at all: the root is the digest of that block.
"""

from __future__ import annotations

from dataclasses import dataclass

from snapshotter.errors import InvalidArgument
from snapshotter.verity.superblock import SUPERBLOCK_SIZE


def tree_start_block(hash_offset: int, hash_block_size: int, superblock: bool) -> int:
    """The hash-block index where the tree starts: the table line's `hash_start_block`.

    With a superblock at `hash_offset`, cryptsetup rounds `hash_offset + 512` up to a hash
    block; without one the tree starts at `hash_offset` itself, which must then be a whole
    number of hash blocks (cryptsetup would silently round down, onto the data).
    """
    if hash_offset < 0 or hash_offset % SUPERBLOCK_SIZE:
        raise InvalidArgument(f"dm-verity hash offset {hash_offset} must be a multiple of 512")
    if superblock:
        return -(-(hash_offset + SUPERBLOCK_SIZE) // hash_block_size)
    if hash_offset % hash_block_size:
        raise InvalidArgument(
            f"without a superblock the hash offset {hash_offset} must be a multiple of the "
            f"hash block size {hash_block_size}"
        )
    return hash_offset // hash_block_size


@dataclass(frozen=True)
class TreeGeometry:
    data_blocks: int
    hash_block_size: int
    digest_size: int
    #: number of hash blocks per level, index 0 = leaf level
    level_blocks: tuple[int, ...]

    @classmethod
    def compute(cls, data_blocks: int, hash_block_size: int, digest_size: int) -> TreeGeometry:
        if data_blocks < 1:
            raise InvalidArgument("dm-verity needs at least one data block")
        if digest_size & (digest_size - 1):
            # Format 1 pads digests to a power of two; the hashes we offer need none.
            raise InvalidArgument(f"digest size {digest_size} is not a power of two")
        per_block = hash_block_size // digest_size
        if per_block < 2:
            raise InvalidArgument(f"hash block size {hash_block_size} holds fewer than two digests")
        levels: list[int] = []
        n = data_blocks
        while n > 1:
            n = -(-n // per_block)
            levels.append(n)
        return cls(data_blocks, hash_block_size, digest_size, tuple(levels))

    @property
    def hashes_per_block(self) -> int:
        return self.hash_block_size // self.digest_size

    @property
    def levels(self) -> int:
        return len(self.level_blocks)

    @property
    def tree_blocks(self) -> int:
        return sum(self.level_blocks)

    @property
    def tree_size(self) -> int:
        return self.tree_blocks * self.hash_block_size

    def level_offset(self, level: int, tree_start: int) -> int:
        """Byte offset of `level` (0 = leaves) given the byte offset where the tree starts."""
        above = sum(self.level_blocks[level + 1 :])
        return tree_start + above * self.hash_block_size

    def entries(self, level: int) -> int:
        """How many digests `level` holds: one per block of the level below (or data block)."""
        return self.data_blocks if level == 0 else self.level_blocks[level - 1]
