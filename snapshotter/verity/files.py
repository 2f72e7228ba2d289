"""Formatting whole files, as `veritysetup format` does.

Appended layout (the default, what containerd's erofs differ writes): the data is zero padded
to a whole data block, the hash area starts right there (`hash_offset`), and with the v1
superblock the tree follows at the next hash-block boundary after its 512 bytes. Without a
superblock the tree must start on a hash-block boundary, so the data is zero padded to
max(data block, hash block) and the padding counts as data blocks (then `blocknum = offset /
blocksize` holds for every consumer, as Kata's multi-layer EROFS path assumes).

Appending to a file that already ends with a tree (formatting twice) would hash the old tree
as data and append a second one; `format_file` refuses that unless told otherwise, see
`find_appended_tree`.
"""

from __future__ import annotations

import bisect
import hashlib
import os
from pathlib import Path
from typing import BinaryIO

from snapshotter.errors import AlreadyExists, EpError, InvalidArgument
from snapshotter.fsutil import atomic_output, os_error_class
from snapshotter.verity.builder import VerityTreeBuilder
from snapshotter.verity.digests import DEFAULT_MEMORY_LIMIT
from snapshotter.verity.geometry import TreeGeometry, tree_start_block
from snapshotter.verity.info import VerityInfo
from snapshotter.verity.parallel import file_leaf_digests
from snapshotter.verity.params import HASH_NAMES, VerityParams, derive_salt
from snapshotter.verity.superblock import SUPERBLOCK_SIZE, VeritySuperblock

BLOCK_SIZES = (512, 1024, 2048, 4096)  # what VerityParams.validate accepts

PathLike = str | os.PathLike[str]


def file_sha256(path: PathLike) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(8 << 20)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.digest()


def default_params(data_path: PathLike) -> VerityParams:
    """containerd's geometry (sha256, 4096/4096, superblock) with the salt derived from the
    data file's sha256 (its content as given, before any padding)."""
    return VerityParams(salt=derive_salt(file_sha256(data_path)))


def format_file(
    data_path: PathLike,
    *,
    hash_path: PathLike | None = None,
    params: VerityParams | None = None,
    workers: int | None = None,
    memory_limit: int = DEFAULT_MEMORY_LIMIT,
    append_again: bool = False,
) -> VerityInfo:
    """Build the hash tree of a file; return its description.

    `hash_path` None: append the tree to the data file (see the module doc for padding).
    Otherwise write [superblock +] tree to a new `hash_path` (at offset 0) that appears only
    when complete; the data must then be whole data blocks (we do not modify it).
    `params` None: `default_params(data_path)`. `workers`: hashing processes (default: one
    per CPU; 1 = in this process). Appending to a file that already ends with a tree (with
    a superblock) is an EpError, the file unchanged, unless `append_again`.
    """
    data_path = Path(data_path)
    try:
        return _format(data_path, hash_path, params, workers, memory_limit, append_again)
    except OSError as exc:
        where = exc.filename or data_path
        if (
            hash_path is not None
            and os.path.dirname(where) == os.path.dirname(os.path.abspath(hash_path))
            and os.path.basename(where).startswith(f".{Path(hash_path).name}.")
        ):
            where = hash_path  # atomic_output's temp name stands for the hash file
        raise os_error_class(exc)(f"verity format: {where}: {exc.strerror or exc}") from None


def _format(
    data_path: Path,
    hash_path: PathLike | None,
    params: VerityParams | None,
    workers: int | None,
    memory_limit: int,
    append_again: bool,
) -> VerityInfo:
    size = data_path.stat().st_size
    if size == 0:
        raise InvalidArgument(f"{data_path} is empty: dm-verity needs at least one data block")
    if params is None:
        params = default_params(data_path)
    params.validate()
    dbs = params.data_block_size
    if hash_path is None:
        existing = None if append_again else find_appended_tree(data_path)
        if existing is not None:
            offset, sb = existing
            raise AlreadyExists(
                f"{data_path} already ends with a dm-verity tree (superblock at byte {offset}: "
                f"{sb.algorithm}, {sb.data_block_size}/{sb.hash_block_size}, "
                f"{sb.data_blocks} data blocks); formatting again would append a second one "
                "(--force to do it anyway)"
            )
        align = dbs if params.superblock else max(dbs, params.hash_block_size)
        hash_offset = -(-size // align) * align
        data_blocks = hash_offset // dbs
        with open(data_path, "r+b") as f:
            try:
                f.truncate(hash_offset)  # zero padding up to the hash area
                info = _build(data_path, data_blocks, f, hash_offset, params, workers, memory_limit)
                f.truncate(_hash_area_end(info))
                os.fsync(f.fileno())
            except BaseException:
                f.truncate(size)  # leave the data as it was
                raise
        return info
    if size % dbs:
        raise InvalidArgument(
            f"{data_path} is {size} bytes, not a whole number of {dbs}-byte data blocks "
            "(pad it, or let the tree be appended, which pads)"
        )
    with atomic_output(Path(hash_path)) as out:
        return _build(data_path, size // dbs, out, 0, params, workers, memory_limit)


def find_appended_tree(path: PathLike) -> tuple[int, VeritySuperblock] | None:
    """(hash offset, superblock) of a dm-verity tree appended to PATH, or None.

    An appended tree with a superblock (ours, or `veritysetup format DATA DATA --hash-offset
    N*dbs`) ends the file: data blocks, the v1 superblock at data_blocks * data_block_size,
    the tree, nothing after. For each geometry a superblock can declare (block sizes, hash),
    the file size leaves a few candidates for data_blocks, since the end of the hash area
    never decreases with it: a binary search per geometry finds them, and one counts only if
    the superblock at its offset declares exactly that geometry and that many data blocks. No data
    is scanned, and arbitrary data cannot pass by accident. A tree without a superblock
    leaves no mark and is not found.
    """
    size = os.stat(path).st_size
    candidates: dict[int, list[tuple[int, int, str]]] = {}
    for dbs in BLOCK_SIZES:
        for hbs in BLOCK_SIZES:
            for hash_name in HASH_NAMES:
                for blocks in _data_blocks_ending_at(size, dbs, hbs, _digest_size(hash_name)):
                    candidates.setdefault(blocks * dbs, []).append((dbs, hbs, hash_name))
    if not candidates:
        return None
    with open(path, "rb", buffering=0) as f:
        for offset, geometries in sorted(candidates.items()):
            try:
                sb = VeritySuperblock.deserialize(os.pread(f.fileno(), SUPERBLOCK_SIZE, offset))
            except EpError:
                continue
            declared = (sb.data_block_size, sb.hash_block_size, sb.algorithm)
            if declared in geometries and sb.data_blocks * sb.data_block_size == offset:
                return offset, sb
    return None


def _data_blocks_ending_at(size: int, dbs: int, hbs: int, digest_size: int) -> range:
    """The numbers of data blocks n whose appended hash area (superblock first) ends exactly
    at byte `size`. The end never decreases with n, but several n can share one end (the
    tree starts on a hash-block boundary), so this is a range, usually empty."""

    def end(n: int) -> int:
        start = tree_start_block(n * dbs, hbs, True) * hbs
        return start + TreeGeometry.compute(n, hbs, digest_size).tree_size

    most = size // dbs
    lowest = bisect.bisect_left(range(1, most + 1), size, key=end) + 1
    n = lowest
    while n <= most and end(n) == size:
        n += 1
    return range(lowest, n)


def _hash_area_end(info: VerityInfo) -> int:
    geo = TreeGeometry.compute(info.data_blocks, info.hash_block_size, _digest_size(info.hash_name))
    return info.hash_start_block * info.hash_block_size + geo.tree_size


def _digest_size(hash_name: str) -> int:
    return hashlib.new(hash_name).digest_size


def _build(
    data_path: Path,
    data_blocks: int,
    out: BinaryIO,
    hash_offset: int,
    params: VerityParams,
    workers: int | None,
    memory_limit: int,
) -> VerityInfo:
    with VerityTreeBuilder(params, memory_limit=memory_limit) as builder:
        for b0, digests in file_leaf_digests(
            data_path,
            data_blocks,
            params.data_block_size,
            params.hash_name,
            bytes(params.salt),
            workers=workers,
        ):
            builder.add_leaf_digests(b0, digests)
        return builder.finish(data_blocks, out, hash_offset)
