"""Layer conversion, the differ's core: a layer stream (or a directory) becomes one EROFS blob,
optionally with a dm-verity tree appended, in a single pass over the data.

The blob appears at its final name only when complete (temporary name, fsync, rename); on any
error nothing is left behind. The dm-verity leaves are hashed as the image is written, so
`--verity` costs no second read of the data.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from snapshotter.errors import EpError
from snapshotter.verity.atomic import atomic_output

from .streams import LayerStream
from .tar_import import import_tar
from .writer import DEFAULT_HOLE_CHUNK, DataWriter, ImageParams, header_blocks, write_metadata

# UUIDs of our layer images are UUIDv5 of the diffID in this namespace: the same layer always
# gets the same UUID, and so the same bytes.
LAYER_UUID_NAMESPACE = uuid.UUID("6f1d3c64-5f6e-4d0a-9c61-2f0b5b1e9a17")


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
    verity: object | None  # snapshotter.verity.VerityInfo

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
            "verity": self.verity.to_json() if self.verity is not None else None,
        }


class _VerityFeed:
    """Feeds dm-verity leaves from the image's sequential writes.

    Everything after the header is written in order; the header (superblock block) is written
    last. So leaves are hashed for each whole verity block of the sequential part as it
    passes, and the head is hashed at the end from the file (one block, still in cache).
    """

    def __init__(self, builder, block_size: int, seq_start: int) -> None:
        self.builder = builder
        self.dbs = block_size
        self.first_hashed = -(-seq_start // block_size) * block_size
        self.expect = seq_start
        self.pending = bytearray()
        self.pending_at = self.first_hashed

    def observe(self, offset: int, data: bytes) -> None:
        if offset != self.expect:
            if offset + len(data) <= self.first_hashed:
                return  # the header, hashed in finish()
            raise AssertionError(f"non-sequential image write at {offset}")
        self.expect += len(data)
        skip = max(0, self.first_hashed - offset)
        view = memoryview(data)[skip:]
        if not self.pending and len(view) % self.dbs == 0:
            self.builder.hash_blocks(self.pending_at // self.dbs, view)
            self.pending_at += len(view)
            return
        self.pending += view
        whole = len(self.pending) - len(self.pending) % self.dbs
        if whole:
            self.builder.hash_blocks(self.pending_at // self.dbs, self.pending[:whole])
            del self.pending[:whole]
            self.pending_at += whole

    def finish(self, fd: int) -> int:
        """Hash the head and the zero-padded last block; returns the data size in bytes."""
        end = self.pending_at
        if self.pending:
            last = bytes(self.pending) + bytes(-len(self.pending) % self.dbs)
            self.builder.hash_blocks(self.pending_at // self.dbs, last)
            end += len(last)
        if self.first_hashed:
            head = os.pread(fd, self.first_hashed, 0)
            self.builder.hash_blocks(0, head)
        return end


def _verity_builder(verity, salt_source: str):
    from snapshotter.verity import VerityParams, VerityTreeBuilder, derive_salt

    params = verity
    if params is True:
        params = VerityParams()
    if not params.salt:
        params = VerityParams(**{**params.__dict__, "salt": derive_salt(salt_source)})
    params.validate()
    return VerityTreeBuilder(params), params


def convert_layer(
    source: BinaryIO | str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    expected_diff_id: str | None = None,
    verity=None,
    block_size: int = 4096,
    hole_chunk: int = DEFAULT_HOLE_CHUNK,
) -> ConvertResult:
    """Convert a tar / tar.gz / tar.zst layer into an EROFS blob at `out_path`.

    `verity`: None, True (containerd's defaults: sha256, 4096/4096, salt derived from the
    diffID, tree appended with a v1 superblock) or a `VerityParams`. EpError on bad input or
    a diffID other than `expected_diff_id`; the output then does not exist.
    """
    if isinstance(source, str | os.PathLike):
        with open(source, "rb") as f:
            return convert_layer(f, out_path, expected_diff_id=expected_diff_id, verity=verity,
                                 block_size=block_size, hole_chunk=hole_chunk)
    _check_block_size(block_size)
    out_path = Path(out_path)
    stream = LayerStream(source)
    with atomic_output(out_path) as out:
        fd = out.fileno()
        start = header_blocks(block_size)
        # The verity salt derives from the diffID. When the caller knows it (containerd always
        # does), leaves are hashed while the image is written; otherwise the diffID is known
        # only at the end and the image is hashed once more from the page cache.
        feed = builder = vparams = None
        if verity and expected_diff_id is not None:
            builder, vparams = _verity_builder(verity, expected_diff_id)
            feed = _VerityFeed(builder, vparams.data_block_size, start * block_size)
        data = DataWriter(fd, block_size, start, feed.observe if feed else None, hole_chunk)
        tree = import_tar(stream, data)
        stream.drain()
        if expected_diff_id is not None and stream.diff_id != expected_diff_id:
            raise EpError(f"diffID mismatch: layer is {stream.diff_id}, "
                          f"expected {expected_diff_id}")
        params = ImageParams(
            block_size=block_size,
            build_time=tree.build_time,
            build_time_nsec=tree.build_time_nsec,
            uuid=uuid.uuid5(LAYER_UUID_NAMESPACE, stream.diff_id).bytes,
        )
        sb = write_metadata(data, tree.root, params)
        size = sb.blocks * block_size
        info = None
        if verity:
            if feed is None:
                builder, vparams = _verity_builder(verity, stream.diff_id)
                feed = _VerityFeed(builder, vparams.data_block_size, 0)
                _rehash(fd, size, feed)
            data_end = feed.finish(fd)
            info = builder.finish(data_end // vparams.data_block_size, out, data_end)
    return ConvertResult(
        blob=out_path, size=size, diff_id=stream.diff_id,
        compressed_digest=stream.compressed_digest, compression=stream.compression,
        entries=tree.entries, blocks=sb.blocks, block_size=block_size,
        uuid=str(uuid.UUID(bytes=params.uuid)), verity=info,
    )


def _rehash(fd: int, size: int, feed: _VerityFeed) -> None:
    offset = 0
    while offset < size:
        chunk = os.pread(fd, min(4 << 20, size - offset), offset)
        if not chunk:
            raise EpError("image shorter than written")
        feed.observe(offset, chunk)
        offset += len(chunk)


def _check_block_size(block_size: int) -> None:
    if block_size not in (512, 1024, 2048, 4096):
        raise EpError(f"block size {block_size}: must be 512, 1024, 2048 or 4096")
