"""Read-only directories of pre-built layers keyed by diffID, in containerd's layout.

containerd's erofs snapshotter reads `layer_content_caches` (plugins/snapshots/erofs): a blob
per layer at `<dir>/<algo>/<first two hex digits>/<hex>.erofs`, the hex being the layer's
diffID (sha256 of the uncompressed tar; a native EROFS layer's blob digest), with its
dm-verity tree appended and containerd's `<blob>.dmverity` sidecar (`{"roothash",
"hashoffset"}`) beside it. `ctr images build-erofs-cache` and `erofs-passthrough publish
--out-cache` fill one; neither containerd nor `serve` ever writes to it.

The differ is given only the layer's compressed digest, so the diffID comes from the
extraction snapshot, as containerd's own snapshotter takes it (from its labels, at Prepare):
containerd 2.3+ labels it `containerd.io/snapshot/diff-id`; older ones give only the chain ID
(the `containerd.io/snapshot.ref` label of a pull's unpacker, and in every version the
extraction key's last word). A bottom layer's chain ID is its diffID; above it, chain ID =
sha256(parent chain ID + " " + diffID), so the cache's entry whose diffID gives the label's
chain ID over the snapshot's parent (which containerd names by its chain ID) is the layer.

Prepare looks the same entry up when containerd's unpacker labels an extraction with its chain
ID, and commits the layer there, so containerd skips the layer's download (snapshots.py
`_commit_from_cache`; docs/containerd.md "Layer cache").

An entry is trusted no more than a layer from a registry: it is copied (reflinked where the
file system can) into the snapshot first, and the copy is checked, so a cache changed
underneath cannot slip anything past: the verity superblock must declare the geometry every
layer uses, the tree must verify against the sidecar's root hash, and the EROFS image must pass
the checks a native EROFS layer passes (`erofs.validate`). What it cannot check is that the
image holds the diffID's files: the directory's owner vouches for that, as for containerd.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from snapshotter.errors import CorruptImage, EpError, InvalidArgument
from snapshotter.fsutil import atomic_output
from snapshotter.service.layer_build import BLOCK, LayerMeta
from snapshotter.verity import VerityInfo, VerityParams
from snapshotter.verity.info import SIDECAR_SUFFIX
from snapshotter.verity.superblock import SUPERBLOCK_SIZE, VeritySuperblock

DIFF_ID_LABEL = "containerd.io/snapshot/diff-id"  # containerd 2.3+ unpacker
CHAIN_ID_LABEL = "containerd.io/snapshot.ref"  # every unpacker: the layer's chain ID
BLOB_SUFFIX = ".erofs"
MAX_SIDECAR_BYTES = 4096  # a sidecar is two keys; refuse anything bigger


class CacheEntryError(CorruptImage):
    """A cache entry that is not a sound layer; the differ converts the layer instead."""


def parse_diff_id(value: str) -> tuple[str, str] | None:
    """(algorithm, hex) of a `sha256:<64 hex>` digest, or None."""
    algo, sep, hexdigest = value.partition(":")
    if (
        sep
        and algo == "sha256"
        and len(hexdigest) == 64
        and all(c in "0123456789abcdef" for c in hexdigest)
    ):
        return algo, hexdigest
    return None


def blob_path(directory: Path, diff_id: str) -> Path:
    """`<directory>/<algo>/<xx>/<hex>.erofs`, containerd's `erofsutils.CacheBlobPath`."""
    parsed = parse_diff_id(diff_id)
    if parsed is None:
        raise InvalidArgument(f"not a sha256 diffID: {diff_id!r}")
    algo, hexdigest = parsed
    return directory / algo / hexdigest[:2] / (hexdigest + BLOB_SUFFIX)


def chain_id(parent_chain_id: str, diff_id: str) -> str:
    """The OCI chain ID of a layer DIFF_ID over PARENT_CHAIN_ID ("" for a bottom layer)."""
    if not parent_chain_id:
        return diff_id
    return "sha256:" + hashlib.sha256(f"{parent_chain_id} {diff_id}".encode()).hexdigest()


def write_entry(directory: Path, diff_id: str, layer: Path, verity: VerityInfo) -> Path:
    """Put LAYER (an EROFS image with its tree appended, as a snapshot's layer.erofs) into
    the cache DIRECTORY as DIFF_ID's entry: blob first, then its sidecar, each by temp name
    + fsync + rename, so a reader sees no entry, or a blob without a sidecar (a miss), or
    both complete."""
    target = blob_path(directory, diff_id)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(layer, "rb") as src, atomic_output(target) as out:
        _copy(src.fileno(), out.fileno(), os.fstat(src.fileno()).st_size)
    verity.write_containerd_sidecar(target)
    return target


def _copy(src_fd: int, dst_fd: int, size: int) -> None:
    """SIZE bytes from SRC_FD to DST_FD (both at offset 0): os.copy_file_range, which
    reflinks or copies inside the kernel, else a plain copy (another file system, old
    kernels)."""
    done = 0
    try:
        while done < size:
            n = os.copy_file_range(src_fd, dst_fd, size - done, done, done)
            if n == 0:
                raise CacheEntryError("cache blob shrank while it was copied")
            done += n
        return
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            raise
    os.lseek(src_fd, done, os.SEEK_SET)
    os.lseek(dst_fd, done, os.SEEK_SET)
    with open(src_fd, "rb", closefd=False) as src, open(dst_fd, "wb", closefd=False) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


def _read_sidecar(blob: Path) -> tuple[str, int]:
    """(root hash, hash offset) from BLOB's containerd sidecar; CacheEntryError if unusable."""
    sidecar = Path(str(blob) + SIDECAR_SUFFIX)
    try:
        with open(sidecar, "rb") as f:
            raw = f.read(MAX_SIDECAR_BYTES + 1)
    except OSError as exc:
        raise CacheEntryError(f"{sidecar}: cannot read: {exc.strerror}") from None
    if len(raw) > MAX_SIDECAR_BYTES:
        raise CacheEntryError(f"{sidecar}: larger than {MAX_SIDECAR_BYTES} bytes")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CacheEntryError(f"{sidecar}: not JSON") from None
    root = data.get("roothash") if isinstance(data, dict) else None
    offset = data.get("hashoffset") if isinstance(data, dict) else None
    if (
        not isinstance(root, str)
        or len(root) != 64
        or any(c not in "0123456789abcdef" for c in root)
    ):
        raise CacheEntryError(f"{sidecar}: roothash is not a sha256 hex digest")
    if not isinstance(offset, int) or isinstance(offset, bool) or offset <= 0 or offset % BLOCK:
        raise CacheEntryError(f"{sidecar}: hashoffset is not a positive multiple of {BLOCK}")
    return root, offset


class LayerCache:
    """The configured cache directories, searched in order (the first hit wins; a missing or
    unreadable directory is a miss), and the count of layers served from them."""

    def __init__(self, directories: Sequence[Path]) -> None:
        self.directories = [Path(d) for d in directories]
        self._lock = threading.Lock()
        self.hits = 0

    def __bool__(self) -> bool:
        return bool(self.directories)

    def find(self, diff_id: str) -> Path | None:
        """The first cache's blob for DIFF_ID that exists, or None."""
        if parse_diff_id(diff_id) is None:
            return None
        for directory in self.directories:
            blob = blob_path(directory, diff_id)
            try:
                if blob.is_file():
                    return blob
            except OSError:  # a vanished mount: the next cache may have it
                continue
        return None

    def _entries(self) -> Iterator[str]:
        """Every diffID some cache has a blob for."""
        for directory in self.directories:
            try:
                shards = [p for p in (directory / "sha256").iterdir() if len(p.name) == 2]
            except OSError:
                continue
            for shard in shards:
                try:
                    names = [p.name for p in shard.iterdir()]
                except OSError:
                    continue
                for name in names:
                    hexdigest = name.removesuffix(BLOB_SUFFIX)
                    if name.endswith(BLOB_SUFFIX) and hexdigest.startswith(shard.name):
                        yield "sha256:" + hexdigest

    def diff_id_of(self, key: str, labels: dict[str, str], parent: str) -> str | None:
        """The diffID of the layer the extraction snapshot KEY (with LABELS, over the committed
        snapshot PARENT) unpacks, or None when it cannot be known (see the module doc).

        Keys arrive as containerd's metadata layer makes them, `<namespace>/<n>/<name>`;
        containerd names an extraction `extract-<unique> <chain ID>` (`UnpackKeyFormat`: the
        unpacker of a pull, and `image.Unpack` of ctr import/run, which set no labels) and
        commits it under its chain ID, which is thus the parent's name."""
        target = labels.get(CHAIN_ID_LABEL, "")
        if not parse_diff_id(target):
            name = key.rsplit("/", 1)[-1]
            target = name.rsplit(" ", 1)[-1] if name.startswith("extract-") else ""
        parent_chain_id = parent.rsplit("/", 1)[-1] if parent else ""
        known_chain = bool(parse_diff_id(target)) and (
            not parent or bool(parse_diff_id(parent_chain_id))
        )
        labelled = labels.get(DIFF_ID_LABEL, "")
        if parse_diff_id(labelled):
            # containerd 2.3+ names it; where the chain is known too, both must agree
            if known_chain and chain_id(parent_chain_id, labelled) != target:
                return None
            return labelled
        if not known_chain:  # not an extraction, or a parent not named by its chain ID
            return None
        if not parent:
            return target
        return _matching(self._entries(), parent_chain_id, target)

    def stage(
        self,
        blob: Path,
        out: Path,
        diff_id: str,
        layer_verity: bool | VerityParams,
        max_image_bytes: int | None = None,
    ) -> LayerMeta:
        """Copy cache BLOB to OUT and check the copy (module doc); its LayerMeta. Raises
        CacheEntryError when it is not a layer this node would use, or when its image is
        bigger than MAX_IMAGE_BYTES (the ceiling a conversion has)."""
        from snapshotter.erofs.reader import ErofsImage
        from snapshotter.ingest.validate import validate_layer
        from snapshotter.verity.verify import verify_file

        root_hash, hash_offset = _read_sidecar(blob)
        if max_image_bytes is not None and hash_offset > max_image_bytes:
            raise CacheEntryError(
                f"{blob}: a {hash_offset}-byte image, more than the "
                f"{max_image_bytes} bytes a layer may have"
            )
        try:
            with open(blob, "rb") as src, open(out, "r+b") as dst:
                dst.truncate(0)
                _copy(src.fileno(), dst.fileno(), os.fstat(src.fileno()).st_size)
                dst.flush()
                size = os.fstat(dst.fileno()).st_size
                if size < hash_offset + SUPERBLOCK_SIZE:
                    raise CacheEntryError(
                        f"{blob}: {size} bytes, no verity superblock at {hash_offset}"
                    )
                try:
                    sb = VeritySuperblock.deserialize(
                        os.pread(dst.fileno(), SUPERBLOCK_SIZE, hash_offset)
                    )
                except EpError as exc:
                    raise CacheEntryError(f"{blob}: {exc}") from exc
        except OSError as exc:
            raise CacheEntryError(f"{blob}: cannot copy: {exc.strerror}") from None
        geometry = (sb.algorithm, sb.data_block_size, sb.hash_block_size)
        if geometry != ("sha256", BLOCK, BLOCK) or sb.data_blocks * BLOCK != hash_offset:
            raise CacheEntryError(
                f"{blob}: verity superblock declares {geometry} and "
                f"{sb.data_blocks} data blocks, not sha256 4096/4096 ending "
                f"at {hash_offset}"
            )
        unsalted = isinstance(layer_verity, VerityParams) and layer_verity.unsalted
        if unsalted and sb.salt:
            raise CacheEntryError(
                f"{blob}: salted tree, and this node stores unsalted ones (kata_verity)"
            )
        info = LayerMeta(
            blob_size=hash_offset,
            blob_digest="",
            root_hash=root_hash,
            salt=sb.salt.hex(),
            hash_offset=hash_offset,
        ).verity()
        try:
            verify_file(out, info)
        except EpError as exc:
            raise CacheEntryError(f"{blob}: {exc}") from exc
        label = f"cached layer {diff_id[:19]}"
        with open(out, "rb") as f:
            try:
                with ErofsImage(f.fileno(), name=label) as img:
                    validate_layer(img, hash_offset, label)
            except FileNotFoundError:
                raise CacheEntryError(f"{blob}: not an EROFS image") from None
            except EpError as exc:
                raise CacheEntryError(f"{blob}: {exc}") from exc
            digest = hashlib.sha256()
            for chunk in _read_range(f, hash_offset):
                digest.update(chunk)
        with self._lock:
            self.hits += 1
        return LayerMeta(
            blob_size=hash_offset,
            blob_digest="sha256:" + digest.hexdigest(),
            root_hash=root_hash,
            salt=sb.salt.hex(),
            hash_offset=hash_offset,
            diff_id=diff_id,
        )


def _matching(diff_ids: Iterable[str], parent_chain_id: str, target: str) -> str | None:
    for diff_id in diff_ids:
        if chain_id(parent_chain_id, diff_id) == target:
            return diff_id
    return None


def _read_range(f, size: int) -> Iterator[bytes]:
    f.seek(0)
    left = size
    while left:
        chunk = f.read(min(left, 1 << 20))
        if not chunk:
            raise CacheEntryError("cache blob shrank while it was checked")
        left -= len(chunk)
        yield chunk
