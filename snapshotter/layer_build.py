"""A committed layer's files: layer.erofs (+ dm-verity tree) and layer.json, written atomically.

`publish_layer` is the only way a layer blob appears in a snapshot directory:
  1. remove an older layer.json, then an older layer.erofs (each removal fsync'd);
  2. PRODUCE writes the image (+ tree) to a temp name, which is fsync'd and renamed to layer.erofs;
  3. layer.json (LayerMeta) is written by temp name + rename.
So if layer.json exists, layer.erofs exists and is the one it describes: a Commit that finds
both (left by the differ, or by a Commit killed before its metadata transaction) reuses them,
anything less is redone.

`convert_directory` turns an unpacked layer directory (an overlay upper: whiteouts as 0:0
character devices, opaque directories as trusted.overlay.opaque=y) into that image.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from snapshotter.errors import EpError
from snapshotter.fsutil import fsync_file, rename_durable, unlink_durable, write_atomic

LAYER = "layer.erofs"
META = "layer.json"
LABEL_PREFIX = "containerd.io/snapshot/erofs."
BLOCK = 4096


@dataclass(frozen=True)
class LayerMeta:
    """What we know of a layer blob; its labels are what Stat shows for the snapshot."""

    blob_size: int          # bytes of the EROFS image; the verity tree starts at hash_offset
    blob_digest: str        # sha256:... of those bytes
    root_hash: str          # dm-verity root hash (hex), sha256, 4096/4096, v1 superblock
    salt: str               # hex
    hash_offset: int        # byte offset of the verity superblock in layer.erofs
    diff_id: str = ""       # sha256 of the uncompressed tar, when built from one

    def labels(self) -> dict[str, str]:
        labels = {
            LABEL_PREFIX + "blob.digest": self.blob_digest,
            LABEL_PREFIX + "blob.size": str(self.blob_size),
            LABEL_PREFIX + "verity.root-hash": self.root_hash,
            LABEL_PREFIX + "verity.salt": self.salt,
            LABEL_PREFIX + "verity.hash-offset": str(self.hash_offset),
        }
        if self.diff_id:
            labels[LABEL_PREFIX + "diff-id"] = self.diff_id
        return labels


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
    """Build a layer with PRODUCE(temp path) and make it DIRECTORY's layer (see module doc)."""
    unlink_durable(directory / META)
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
    write_atomic(directory / META, json.dumps(asdict(meta), sort_keys=True).encode())
    return meta


def convert_directory(src: Path, out: Path) -> LayerMeta:
    """Unpacked layer directory SRC -> EROFS image + appended dm-verity tree at OUT.

    Stand-in until the EROFS engine's directory converter lands: Debian's mkfs.erofs (no inline
    tail data, so the fsmeta merge can address every file block) and veritysetup.
    """
    proc = subprocess.run(
        ["mkfs.erofs", "--quiet", "-Enoinline_data", str(out), str(src)],
        capture_output=True, text=True,
    )
    if proc.returncode != 0:
        raise EpError(f"mkfs.erofs {src}: {proc.stderr.strip() or proc.stdout.strip()}")
    size, digest = _pad_and_digest(out)
    salt = secrets.token_hex(32)
    root = _veritysetup_format(out, size, salt)
    return LayerMeta(size, digest, root, salt, size)


def _pad_and_digest(path: Path) -> tuple[int, str]:
    """Pad PATH to a whole number of 4 KiB blocks; return (size, sha256 digest)."""
    h = hashlib.sha256()
    with open(path, "r+b") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
        size = f.tell()
        pad = -size % BLOCK
        if pad:
            f.write(bytes(pad))
            h.update(bytes(pad))
    return size + pad, "sha256:" + h.hexdigest()


def _veritysetup_format(path: Path, hash_offset: int, salt: str) -> str:
    proc = subprocess.run(
        ["veritysetup", "format", str(path), str(path), f"--hash-offset={hash_offset}",
         f"--data-blocks={hash_offset // BLOCK}",
         f"--salt={salt}", "--data-block-size=4096", "--hash-block-size=4096"],
        capture_output=True, text=True,
    )
    if proc.returncode != 0:
        raise EpError(f"veritysetup format {path}: {proc.stderr.strip()}")
    for line in proc.stdout.splitlines():
        if line.startswith("Root hash:"):
            return line.split(":", 1)[1].strip()
    raise EpError(f"veritysetup format printed no root hash: {proc.stdout!r}")
