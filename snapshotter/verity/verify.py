"""Verifying a file against its hash tree, as `veritysetup verify` does, but naming the first
bad block.

Checked top-down, the way the kernel trusts it: the top hash block against the root hash,
each hash block against its already verified parent digest (so a tampered hash block is named
as such, not blamed on the data), the spare areas for zeros (as cryptsetup does), then every
data block against its verified leaf digest.
"""

from __future__ import annotations

import os
from pathlib import Path

from snapshotter.errors import CorruptImage, InvalidArgument, NotFound, VerityMismatch
from snapshotter.fsutil import os_error_class
from snapshotter.verity.digests import DEFAULT_MEMORY_LIMIT, DigestStore
from snapshotter.verity.geometry import TreeGeometry, tree_start_block
from snapshotter.verity.hashing import SaltedBase, hash_run, salted_base
from snapshotter.verity.info import VerityInfo
from snapshotter.verity.parallel import file_leaf_digests
from snapshotter.verity.params import HASH_TYPE, VerityParams
from snapshotter.verity.superblock import SUPERBLOCK_SIZE, VeritySuperblock

PathLike = str | os.PathLike[str]

#: hash-area bytes checked per step
_CHUNK = 4 << 20


def read_superblock(path: PathLike, offset: int = 0) -> VeritySuperblock:
    if not 0 <= offset < 1 << 63:  # what a file offset can be (f.seek raises beyond)
        raise InvalidArgument(f"verity superblock offset {offset} is not a possible file offset")
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            raw = f.read(SUPERBLOCK_SIZE)
    except OSError as exc:
        raise os_error_class(exc)(f"cannot read {path}: {exc.strerror}") from None
    return VeritySuperblock.deserialize(raw)


def verify_file(
    data_path: PathLike,
    info_or_params: VerityInfo | VerityParams,
    hash_path: PathLike | None = None,
    *,
    root_hash: str | None = None,
    hash_offset: int | None = None,
    data_blocks: int | None = None,
    workers: int | None = None,
    memory_limit: int = DEFAULT_MEMORY_LIMIT,
) -> None:
    """Check data and tree against the root hash; raise EpError naming the first bad block.

    With a VerityInfo everything comes from it. With VerityParams, `root_hash` is required,
    `hash_offset` defaults to 0 for a separate `hash_path` (and is required for an appended
    tree), and `data_blocks` comes from the superblock, else from the data size (separate
    hash file) or `hash_offset / data_block_size` (appended).
    """
    if isinstance(info_or_params, VerityInfo):
        info = info_or_params
        params = info.params()
        root_hash = info.root_hash if root_hash is None else root_hash
        hash_offset = info.hash_offset if hash_offset is None else hash_offset
        data_blocks = info.data_blocks if data_blocks is None else data_blocks
    else:
        params = info_or_params
    params.validate()
    if root_hash is None:
        raise InvalidArgument("verity verify needs the root hash")
    try:
        root = bytes.fromhex(root_hash)
    except ValueError:
        raise InvalidArgument(f"root hash is not hex: {root_hash!r}") from None
    if len(root) != params.digest_size:
        raise InvalidArgument(
            f"a {params.hash_name} root hash has {params.digest_size * 2} hex digits"
        )
    if hash_offset is None:
        if hash_path is None:
            raise InvalidArgument("an appended hash tree needs its hash offset")
        hash_offset = 0
    hpath = Path(hash_path if hash_path is not None else data_path)
    dpath = Path(data_path)
    for path in (dpath, hpath):
        if not path.is_file():
            raise NotFound(f"{path}: no such file")
    dbs = params.data_block_size
    if params.superblock:
        sb = read_superblock(hpath, hash_offset)
        _check_superblock(sb, params, hpath, hash_offset)
        if data_blocks is not None and data_blocks != sb.data_blocks:
            raise VerityMismatch(
                f"superblock says {sb.data_blocks} data blocks, expected {data_blocks}"
            )
        data_blocks = sb.data_blocks
    elif data_blocks is None:
        data_blocks = (dpath.stat().st_size if hash_path is not None else hash_offset) // dbs
    if data_blocks < 1:
        raise InvalidArgument("no data blocks to verify")
    if dpath.stat().st_size < data_blocks * dbs:
        raise CorruptImage(f"{dpath} is shorter than {data_blocks} data blocks of {dbs} bytes")
    if hash_path is None and data_blocks * dbs > hash_offset:
        raise InvalidArgument(
            f"data area ({data_blocks} blocks) overlaps the hash area at {hash_offset}"
        )

    geo = TreeGeometry.compute(data_blocks, params.hash_block_size, params.digest_size)
    tree_start = tree_start_block(hash_offset, params.hash_block_size, params.superblock)
    tree_start *= params.hash_block_size
    if hpath.stat().st_size < tree_start + geo.tree_size:
        raise CorruptImage(
            f"{hpath}: hash area truncated (needs {tree_start + geo.tree_size} bytes)"
        )
    base = salted_base(params.hash_name, bytes(params.salt))
    with (
        _verified_leaves(hpath, geo, base, tree_start, root, memory_limit) as leaves,
        DigestStore(geo.digest_size, memory_limit=memory_limit) as computed,
    ):
        for b0, digests in file_leaf_digests(
            dpath, data_blocks, dbs, params.hash_name, bytes(params.salt), workers=workers
        ):
            computed.put(b0, digests)
        ds = geo.digest_size
        step = max(1, _CHUNK // ds)
        for e0 in range(0, data_blocks, step):
            n = min(step, data_blocks - e0)
            want, got = leaves.read(e0, n), computed.read(e0, n)
            if want != got:
                bad = e0 + _first_diff(want, got) // ds
                raise VerityMismatch(
                    f"data block {bad} (bytes {bad * dbs}..{(bad + 1) * dbs - 1} of {dpath}) "
                    "does not match its hash: the data is corrupted"
                )


def _check_superblock(sb: VeritySuperblock, p: VerityParams, path: Path, offset: int) -> None:
    mismatches = [
        f"{what} {have!r} (expected {want!r})"
        for what, have, want in (
            ("hash type", sb.hash_type, HASH_TYPE),
            ("hash", sb.algorithm, p.hash_name),
            ("data block size", sb.data_block_size, p.data_block_size),
            ("hash block size", sb.hash_block_size, p.hash_block_size),
            ("salt", sb.salt.hex(), bytes(p.salt).hex()),
            ("uuid", sb.uuid.hex(), (p.uuid or sb.uuid).hex()),
        )
        if have != want
    ]
    if mismatches:
        raise VerityMismatch(
            f"verity superblock at byte {offset} of {path} has " + ", ".join(mismatches)
        )


def _first_diff(a: bytes, b: bytes) -> int:
    return next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)


def _verified_leaves(
    hpath: Path,
    geo: TreeGeometry,
    base: SaltedBase,
    tree_start: int,
    root: bytes,
    memory_limit: int,
) -> DigestStore:
    """Check the tree top-down; return the verified leaf digests (one per data block).

    Each level's digests live in a DigestStore, so memory stays bounded.
    """
    ds = geo.digest_size
    store = DigestStore(ds, memory_limit=memory_limit)
    store.put(0, root)
    if geo.levels == 0:
        return store  # the one data block's digest is the root itself
    hbs = geo.hash_block_size
    per = geo.hashes_per_block
    step = max(1, _CHUNK // hbs)
    try:
        with open(hpath, "rb") as f:
            for level in reversed(range(geo.levels)):
                pos = geo.level_offset(level, tree_start)
                entries = geo.entries(level)
                below = DigestStore(ds, memory_limit=memory_limit)
                try:
                    for b0 in range(0, geo.level_blocks[level], step):
                        nb = min(step, geo.level_blocks[level] - b0)
                        f.seek(pos + b0 * hbs)
                        raw = f.read(nb * hbs)
                        got, want = hash_run(base, raw, hbs), store.read(b0, nb)
                        if got != want:
                            bad = b0 + _first_diff(got, want) // ds
                            where = f"(byte {pos + bad * hbs} of {hpath})"
                            if level == geo.levels - 1:
                                raise VerityMismatch(
                                    f"the top hash block {where} does not match the root hash"
                                )
                            raise VerityMismatch(
                                f"hash block {bad} of level {level} {where} does not match its "
                                "parent hash: the hash tree is corrupted"
                            )
                        used = min(nb * per, entries - b0 * per) * ds
                        if any(raw[used:]):
                            tail = raw[used:]
                            spare = pos + b0 * hbs + used + _first_diff(tail, bytes(len(tail)))
                            raise VerityMismatch(
                                f"spare area of the hash tree is not zero at byte {spare} "
                                f"of {hpath}"
                            )
                        below.put(b0 * per, raw[:used])
                except BaseException:
                    below.close()
                    raise
                store.close()
                store = below
    except BaseException:
        store.close()
        raise
    return store
