"""Layer conversion, the differ's core: a layer stream (or a directory) becomes one EROFS blob,
optionally with a dm-verity tree appended, in a single pass over the data.

The blob appears at its final name only when complete (temporary name, fsync, rename); on any
error nothing is left behind. The dm-verity leaves are hashed as the image is written, so
`--verity` costs no second read of the data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from snapshotter.erofs.format import SUPER_OFFSET
from snapshotter.erofs.limits import DEFAULT_LIMITS, Limits
from snapshotter.erofs.tree import SourceTree
from snapshotter.erofs.writer import (
    DEFAULT_HOLE_CHUNK,
    DEFAULT_INLINE_MAX,
    DataWriter,
    ImageParams,
    header_blocks,
    write_metadata,
)
from snapshotter.errors import CorruptImage, DigestMismatch, InvalidArgument
from snapshotter.fsutil import atomic_output
from snapshotter.gcpause import collector_paused
from snapshotter.ingest.streams import GZIP_MAGIC, ZSTD_MAGIC, ByteReader, LayerStream
from snapshotter.ingest.tar_import import import_tar
from snapshotter.ingest.tarstream import MappedTar

# The verity stack (image_verity, snapshotter.verity), the reader and the validator, and the
# directory importer are imported where they are used: a tar converted without --verity needs
# none of them, and every `erofs-passthrough convert` paid ~10 ms to load them
# (docs/benchmarks.md, "CLI start-up").
if TYPE_CHECKING:
    import uuid

    from snapshotter.erofs.image_verity import VerityFeed
    from snapshotter.verity import VerityInfo, VerityParams

    #: UUIDs of our layer images are UUIDv5 of the diffID in this namespace: the same layer
    #: always gets the same UUID, and so the same bytes and (rules.py) the same verity salt.
    #: A `uuid.UUID`, made on first use (`__getattr__` below).
    LAYER_UUID_NAMESPACE: uuid.UUID

# The namespace's bytes. The uuid module is not imported for conversion (it loads `platform`,
# which with uuid cost ~2 ms of every `convert`'s start; streams.py loads zstandard, which
# loads it too, only for a .tar.zst): `layer_uuid` is RFC 4122's UUIDv5 as `uuid.uuid5`
# computes it, `_uuid_str` its text (both checked against the uuid module by
# tests/unit/test_cli_imports.py, a converted layer's UUID by tests/kernel/test_reproducible.py).
_NAMESPACE = bytes.fromhex("6f1d3c645f6e4d0a9c612f0b5b1e9a17")

if not TYPE_CHECKING:  # for mypy the name above: other unknown names stay errors

    def __getattr__(name: str) -> object:
        if name == "LAYER_UUID_NAMESPACE":
            import uuid

            return uuid.UUID(bytes=_NAMESPACE)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def layer_uuid(identity: str) -> bytes:
    """The superblock UUID of the layer image made from the source IDENTITY (a diffID)."""
    raw = bytearray(hashlib.sha1(_NAMESPACE + identity.encode("utf-8")).digest()[:16])
    raw[6] = (raw[6] & 0x0F) | 0x50  # version 5
    raw[8] = (raw[8] & 0x3F) | 0x80  # the RFC 4122 variant
    return bytes(raw)


def _uuid_str(raw: bytes) -> str:
    """`str(uuid.UUID(bytes=raw))` of a 16-byte UUID."""
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


@dataclass(frozen=True)
class ConvertResult:
    blob: Path
    size: int  # bytes of the EROFS image (without an appended verity tree)
    diff_id: str | None  # sha256 of the tar; None for a directory source
    compressed_digest: str | None  # sha256 of the bytes read (the OCI blob digest)
    compression: str | None
    entries: int
    blocks: int
    block_size: int
    uuid: str
    verity: VerityInfo | None
    blob_digest: str | None = None  # sha256 of the image bytes, when asked for

    def to_json(self) -> dict:
        return {
            "blob": str(self.blob),
            "size": self.size,
            "diff_id": self.diff_id,
            "compressed_digest": self.compressed_digest,
            "compression": self.compression,
            "entries": self.entries,
            "blocks": self.blocks,
            "block_size": self.block_size,
            "uuid": self.uuid,
            "blob_digest": self.blob_digest,
            "verity": self.verity.to_json() if self.verity is not None else None,
        }


def convert_layer(
    source: ByteReader | str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    expected_diff_id: str | None = None,
    verity: VerityParams | bool | None = None,
    block_size: int = 4096,
    hole_chunk: int = DEFAULT_HOLE_CHUNK,
    blob_digest: bool = False,
    inline_max: int = DEFAULT_INLINE_MAX,
    limits: Limits = DEFAULT_LIMITS,
    tail_packing: bool = False,
    source_digest: bool = True,
) -> ConvertResult:
    """Convert a tar / tar.gz / tar.zst layer into an EROFS blob at `out_path`.

    `verity`: None, True (containerd's defaults: sha256, 4096/4096, salt derived from the
    image's UUID, itself from the diffID (rules.py), tree appended with a v1 superblock) or a
    `VerityParams`. `blob_digest`: also compute the sha256 of the image bytes.
    `source_digest`: the sha256 of the bytes read (the OCI blob digest, which the service
    checks against the layer's descriptor); False leaves `compressed_digest` None and spares a
    compressed layer that hash (the CLI asks for it only when `--json` prints it).
    `tail_packing`: a file's last partial block inline after its inode when it fits, as
    mkfs.erofs does (`DataWriter`); the CLI's default, off for the service unless its
    config says so. `limits`: the
    ceilings on what the layer may cost (decompressed bytes, image bytes, entries, metadata;
    see `limits.Limits`). EpError on bad input, a layer over a limit, or a diffID other than
    `expected_diff_id`; the output then does not exist.
    """
    if isinstance(source, str | os.PathLike):
        with open(source, "rb") as f:
            return convert_layer(
                f,
                out_path,
                expected_diff_id=expected_diff_id,
                verity=verity,
                block_size=block_size,
                hole_chunk=hole_chunk,
                blob_digest=blob_digest,
                inline_max=inline_max,
                limits=limits,
                tail_packing=tail_packing,
                source_digest=source_digest,
            )
    stream: LayerStream | MappedTar | None = None

    def build(data: DataWriter) -> tuple[SourceTree, Callable[[], str]]:
        nonlocal stream
        mapped = _mapped_tar(source, limits)
        layer = LayerStream(source, limits, source_digest=source_digest) if mapped is None else None
        stream = mapped or layer
        assert stream is not None
        try:
            tree = import_tar(stream, data, limits)
            if layer is not None:
                layer.drain()
        except BaseException:
            stream.close()  # the producer or hashing thread ends here, on error
            raise
        if layer is not None:
            layer.close()

        def identity() -> str:
            """The diffID, checked; for a mapped tar the hashing thread may still run while
            the metadata is written, and is waited for here."""
            assert stream is not None
            if mapped is not None:
                mapped.finish()  # the digest of the whole file, as LayerStream's drain gives
                source.seek(0, os.SEEK_END)  # type: ignore[attr-defined]  # read to the end
                mapped.close()
            if expected_diff_id is not None and stream.diff_id != expected_diff_id:
                raise DigestMismatch(
                    f"diffID mismatch: layer is {stream.diff_id}, expected {expected_diff_id}"
                )
            return stream.diff_id

        return tree, identity

    try:
        result = _convert(
            Path(out_path),
            build,
            identity_hint=expected_diff_id,
            verity=verity,
            block_size=block_size,
            hole_chunk=hole_chunk,
            blob_digest=blob_digest,
            inline_max=inline_max,
            limits=limits,
            tail_packing=tail_packing,
        )
    finally:
        if stream is not None:
            stream.close()  # a hashing thread still running when the metadata failed
    assert stream is not None  # _convert returns only after `build` ran
    return dataclasses.replace(
        result,
        diff_id=stream.diff_id,
        compressed_digest=stream.compressed_digest if source_digest else None,
        compression=stream.compression,
    )


def _mapped_tar(source: ByteReader, limits: Limits) -> MappedTar | None:
    """The fast path for a plain tar in a regular file (a seekable fd): `MappedTar`, from the
    source's position to the end of the file; None for anything else (a pipe, a socket, a
    compressed layer, an empty or over-limit file), which `LayerStream` reads."""
    try:
        fd = source.fileno()  # type: ignore[attr-defined]
        start = source.tell()  # type: ignore[attr-defined]
        st = os.fstat(fd)
    except (AttributeError, OSError, io.UnsupportedOperation):
        return None
    end = st.st_size
    # Over max_tar_bytes: LayerStream refuses it at the point of the stream where it happens.
    if not stat.S_ISREG(st.st_mode) or not 0 <= start < end or end - start > limits.max_tar_bytes:
        return None
    head = os.pread(fd, 4, start)
    if head.startswith((GZIP_MAGIC, ZSTD_MAGIC)):
        return None
    return MappedTar(fd, start, end)


def convert_directory(
    src_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    verity: VerityParams | bool | None = None,
    block_size: int = 4096,
    hole_chunk: int = DEFAULT_HOLE_CHUNK,
    blob_digest: bool = False,
    inline_max: int = DEFAULT_INLINE_MAX,
    tail_packing: bool = False,
) -> ConvertResult:
    """Convert an unpacked layer directory (whiteouts as 0:0 devices, opaque xattrs) into an
    EROFS blob. The UUID derives from the tree's content, and the default verity salt from the
    UUID."""
    src = Path(src_dir)

    def build(data: DataWriter) -> tuple[SourceTree, Callable[[], str]]:
        from snapshotter.ingest.dir_import import import_directory

        tree, identity = import_directory(src, data)
        return tree, lambda: identity

    return _convert(
        Path(out_path),
        build,
        identity_hint=None,
        verity=verity,
        block_size=block_size,
        hole_chunk=hole_chunk,
        blob_digest=blob_digest,
        inline_max=inline_max,
        tail_packing=tail_packing,
    )


def import_erofs_image(
    source: BinaryIO,
    out_path: str | os.PathLike[str],
    *,
    expected_digest: str | None = None,
    verity: VerityParams | bool | None = None,
) -> ConvertResult:
    """Store a native EROFS layer (`application/vnd.erofs.layer.v1`) as it is: copied while
    hashed, checked against `expected_digest`, validated completely (`validate.validate_layer`:
    what fsck.erofs and the kernel check, and that it is an uncompressed single-device image
    our merge can address), zero-padded to whole blocks, and given a verity tree. Its salt
    follows the one rule for every layer (`rules.py`): derived from the image's superblock
    UUID, so the image a tar converts to gets the same salt and root whichever way it
    arrives; an image whose UUID is all zero is salted from its digest (of the bytes as they
    arrived, before the padding), which for an uncompressed native layer is its diffID.
    Nothing is left at `out_path` on error."""
    from snapshotter.erofs.image_verity import append_verity
    from snapshotter.erofs.reader import ErofsImage
    from snapshotter.ingest.validate import validate_layer
    from snapshotter.verity.params import derive_layer_salt

    out_path = Path(out_path)
    digest = hashlib.sha256()
    with atomic_output(out_path) as out:
        size = 0
        while chunk := source.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
            size += len(chunk)
        out.flush()
        got = "sha256:" + digest.hexdigest()
        if expected_digest is not None and got != expected_digest:
            raise DigestMismatch(
                f"digest mismatch: EROFS layer is {got}, expected {expected_digest}"
            )
        label = f"EROFS layer {got[:19]}"
        try:
            with ErofsImage(out.fileno(), name=label) as img:
                bs, blocks, fs_uuid = img.block_size, img.sb.blocks, img.sb.uuid
                checked = validate_layer(img, size, label)
        except FileNotFoundError:
            raise CorruptImage("not an EROFS image") from None
        padded = -(-size // 4096) * 4096
        out.truncate(padded)
        digest.update(bytes(padded - size))
        info = None
        if verity:
            info = append_verity(out, padded, verity, derive_layer_salt(fs_uuid, got))
    return ConvertResult(
        blob=out_path,
        size=padded,
        diff_id=got,
        compressed_digest=got,
        compression=None,
        entries=checked.entries,
        blocks=blocks,
        block_size=bs,
        uuid=_uuid_str(fs_uuid),
        verity=info,
        blob_digest="sha256:" + digest.hexdigest(),
    )


def _convert(
    out_path: Path,
    build: Callable[[DataWriter], tuple[SourceTree, Callable[[], str]]],
    *,
    identity_hint: str | None,
    verity: VerityParams | bool | None,
    block_size: int,
    hole_chunk: int,
    blob_digest: bool,
    inline_max: int = DEFAULT_INLINE_MAX,
    limits: Limits | None = None,
    tail_packing: bool = False,
) -> ConvertResult:
    """Write the image of whatever `build` reads, atomically, with optional verity tree.

    `limits` bound the image written (None: only the format does; `build` applies its own).

    `build` returns the tree and a function giving the source's identity (a sha256 digest
    string), from which the UUID derives, and from the UUID the default verity salt. When the
    identity is known up front (`identity_hint`, e.g. the diffID containerd knows) the verity
    leaves are hashed while the image is written; otherwise the image is hashed once more
    from the page cache. The identity is asked for after the metadata is written (a plain
    tar's sha256 runs on a thread meanwhile): without a hint the superblock is written with
    a zero UUID and rewritten with the real one before anything reads the image back.
    """
    _check_block_size(block_size)
    if verity or blob_digest:  # what hashes the image: only then loaded (see the imports)
        from snapshotter.erofs.image_verity import VerityFeed, reread, verity_builder
        from snapshotter.verity.params import derive_layer_salt
    with atomic_output(out_path) as out, collector_paused():  # the tree: all live (gcpause)
        fd = out.fileno()
        start = header_blocks(block_size)
        feed: VerityFeed | None = None
        if verity and identity_hint is not None:
            builder, vparams = verity_builder(verity, derive_layer_salt(layer_uuid(identity_hint)))
            feed = VerityFeed(builder, vparams.data_block_size, start * block_size)
        feeds = [feed] if feed else []  # hashing threads, stopped on every path
        try:
            data = DataWriter(
                fd,
                block_size,
                start,
                feed.observe if feed else None,
                hole_chunk,
                inline_max,
                limits,
                tail_packing=tail_packing,
                early_writeback=True,  # atomic_output fsyncs the image
            )
            tree, identity = build(data)
            params = ImageParams(
                block_size=block_size,
                build_time=tree.build_time,
                build_time_nsec=tree.build_time_nsec,
                uuid=layer_uuid(identity_hint) if identity_hint is not None else bytes(16),
                fill_gaps=tail_packing,
            )
            sb = write_metadata(data, tree.root, params)
            fs_uuid = layer_uuid(identity())  # == params.uuid when there is a hint
            if fs_uuid != params.uuid:
                # Nothing has seen the superblock (a write observer is only set with a hint).
                assert feed is None
                params = dataclasses.replace(params, uuid=fs_uuid)
                sb = dataclasses.replace(sb, uuid=fs_uuid)
                os.pwrite(fd, sb.pack(), SUPER_OFFSET)
            size = sb.blocks * block_size
            digest = hashlib.sha256() if blob_digest else None
            rehash_verity = False
            if verity and identity_hint is None:
                rehash_verity = True
                builder, vparams = verity_builder(verity, derive_layer_salt(params.uuid))
                feed = VerityFeed(builder, vparams.data_block_size, 0)
                feeds.append(feed)
            if digest is not None or rehash_verity:
                reread(fd, size, feed if rehash_verity else None, digest)
            info = None
            if feed is not None:
                data_end = feed.finish(fd)
                info = feed.builder.finish(data_end // feed.dbs, out, data_end)
        finally:
            for f in feeds:
                f.close()
    return ConvertResult(
        blob=out_path,
        size=size,
        diff_id=None,
        compressed_digest=None,
        compression=None,
        entries=tree.entries,
        blocks=sb.blocks,
        block_size=block_size,
        uuid=_uuid_str(params.uuid),
        verity=info,
        blob_digest="sha256:" + digest.hexdigest() if digest is not None else None,
    )


def _check_block_size(block_size: int) -> None:
    if block_size not in (512, 1024, 2048, 4096):
        raise InvalidArgument(f"block size {block_size}: must be 512, 1024, 2048 or 4096")
