"""A committed layer's files: layer.erofs (+ dm-verity tree), layer.erofs.dmverity and
layer.json, each written atomically.

`publish_layer` is the only way a layer blob appears in a snapshot directory:
  1. remove an older layer.json, then an older sidecar and layer.erofs (each removal fsync'd);
  2. PRODUCE writes the image (+ tree) to a temp name, which is fsync'd and renamed to layer.erofs;
  3. layer.erofs.dmverity, containerd's sidecar (`VerityInfo.write_containerd_sidecar`), is
     written by temp name + rename;
  4. layer.json (LayerMeta) is written by temp name + rename.
So if layer.json exists, layer.erofs and its sidecar exist and are the ones it describes: a
Commit that finds them (left by the differ, or by a Commit killed before its metadata
transaction) reuses them, anything less is redone.

The sidecar is what containerd's erofs differ writes beside each blob, so tools written for
containerd's erofs snapshotter (its mount manager, Kata runtime-rs) can read our snapshot tree.
A layer published before sidecars existed gets one from its layer.json (`ensure_sidecar`).

`convert_directory` turns an unpacked layer directory (an overlay upper: whiteouts as 0:0
character devices, opaque directories as trusted.overlay.opaque=y) into that image.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from snapshotter.fsutil import fsync_file, rename_durable, unlink_durable, write_atomic
from snapshotter.verity import VerityInfo, VerityParams
from snapshotter.verity.info import SIDECAR_SUFFIX

if TYPE_CHECKING:
    from snapshotter.ingest.convert import ConvertResult

LAYER = "layer.erofs"
SIDECAR = LAYER + SIDECAR_SUFFIX  # containerd's name: layer.erofs.dmverity
META = "layer.json"
LABEL_PREFIX = "containerd.io/snapshot/erofs."
BLOCK = 4096


@dataclass(frozen=True)
class LayerMeta:
    """What we know of a layer blob; its labels are what Stat shows for the snapshot."""

    blob_size: int  # bytes of the EROFS image; the verity tree starts at hash_offset
    blob_digest: str  # sha256:... of those bytes
    root_hash: str  # dm-verity root hash (hex), sha256, 4096/4096, v1 superblock
    salt: str  # hex
    hash_offset: int  # byte offset of the verity superblock in layer.erofs
    diff_id: str = ""  # sha256 of the uncompressed tar, when built from one

    def labels(self) -> dict[str, str]:
        labels = {
            LABEL_PREFIX + "blob.digest": self.blob_digest,
            LABEL_PREFIX + "blob.size": str(self.blob_size),
            LABEL_PREFIX + "verity.root-hash": self.root_hash,
            LABEL_PREFIX + "verity.salt": self.salt or "-",  # "-": none, as in a dm table
            LABEL_PREFIX + "verity.hash-offset": str(self.hash_offset),
        }
        if self.diff_id:
            labels[LABEL_PREFIX + "diff-id"] = self.diff_id
        return labels

    def verity(self) -> VerityInfo:
        """The full dm-verity description: every layer uses containerd's geometry (sha256,
        4096/4096, v1 superblock at hash_offset, the data being everything before it)."""
        return VerityInfo(
            root_hash=self.root_hash,
            salt=self.salt,
            hash_name="sha256",
            data_block_size=BLOCK,
            hash_block_size=BLOCK,
            data_blocks=self.hash_offset // BLOCK,
            hash_offset=self.hash_offset,
            superblock=True,
            uuid=None,
        )


Producer = Callable[[Path], LayerMeta]


def read_layer(directory: Path) -> LayerMeta | None:
    """The LayerMeta of a complete layer in DIRECTORY, or None."""
    try:
        data = json.loads((directory / META).read_bytes())
    except FileNotFoundError:
        return None
    if not (directory / LAYER).is_file():
        return None
    return LayerMeta(**data)


def publish_layer(directory: Path, produce: Producer) -> LayerMeta:
    """Build a layer with PRODUCE(temp path) and make it DIRECTORY's layer (see module doc).

    Callers hold `Layout.busy` for the snapshot, which admits only a snapshot that is still
    active: a committed snapshot's layer (which its labels describe) is never replaced.
    """
    unlink_durable(directory / META)
    unlink_durable(directory / SIDECAR)
    unlink_durable(directory / LAYER)
    fd, tmp_name = tempfile.mkstemp(prefix=".layer-", suffix=".tmp", dir=directory)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        meta = produce(tmp)
        os.chmod(tmp, 0o644)
        fsync_file(tmp)
        rename_durable(tmp, directory / LAYER)
    finally:
        tmp.unlink(missing_ok=True)
    meta.verity().write_containerd_sidecar(directory / LAYER)
    write_atomic(directory / META, json.dumps(asdict(meta), sort_keys=True).encode())
    return meta


def ensure_sidecar(directory: Path, meta: LayerMeta) -> Path:
    """DIRECTORY's layer.erofs.dmverity, written from META (its layer.json) when missing: a
    layer committed before sidecars were written gets the one publish_layer writes today."""
    sidecar = directory / SIDECAR
    if not sidecar.is_file():
        meta.verity().write_containerd_sidecar(directory / LAYER)
    return sidecar


def convert_directory(
    src: Path, out: Path, verity: bool | VerityParams = True, tail_packing: bool = False
) -> LayerMeta:
    """Unpacked layer directory SRC -> EROFS image + appended dm-verity tree at OUT (VERITY:
    True for containerd's salted geometry, or the parameters, e.g. KATA_VERITY)."""
    from snapshotter.ingest.convert import convert_directory as convert

    return layer_meta(convert(src, out, verity=verity, blob_digest=True, tail_packing=tail_packing))


def layer_meta(result: ConvertResult, diff_id: str = "") -> LayerMeta:
    """The LayerMeta of a conversion that was asked for a verity tree and the blob digest."""
    v, blob_digest = result.verity, result.blob_digest
    if v is None or blob_digest is None:
        raise AssertionError(f"{result.blob}: converted without verity or blob digest")
    return LayerMeta(
        blob_size=result.size,
        blob_digest=blob_digest,
        root_hash=v.root_hash,
        salt=v.salt,
        hash_offset=v.hash_offset,
        diff_id=diff_id,
    )
