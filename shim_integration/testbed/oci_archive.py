"""Small OCI image archives (for `ctr images import`) from layer specs, in Python: the demo's image
and the containerd tests' images.

The layer-spec language (shared with the tests, tests/support/layers.py): a layer is a list of
`Entry`s, one tar member each, written by `tarinfo`. A layer may also be written in the
shorthand tuples, each read as one `Entry` by `entry_of`: ("dir", path, mode), ("file", path,
data, mode), ("link", path, target, mode) for hard links, ("symlink", path, target),
("whiteout", path) and ("opaque", dir); ("file", ...) may carry xattrs as a 5th item (dict
name -> bytes, written as PAX SCHILY.xattr).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from snapshotter.ingest.whiteouts import OPAQUE_ENTRY, whiteout_of

MTIME = 1_700_000_000


@dataclass(frozen=True)
class Blob:
    media_type: str
    data: bytes

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.data).hexdigest()

    def descriptor(self, **extra: object) -> dict:
        return {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": len(self.data),
            **extra,
        }


@dataclass
class Entry:
    """One tar member. `kind`: file, dir, symlink, hardlink, chr, blk, fifo. Whiteouts are
    what a layer holds: empty files named `.wh.NAME` (and `.wh..wh..opq`)."""

    name: str
    kind: str = "file"
    data: bytes = b""
    mode: int | None = None  # default 0o755 for a dir, 0o644 otherwise
    uid: int = 0
    gid: int = 0
    mtime: float | str = MTIME  # a str is an exact PAX mtime, e.g. "1700000000.123456789"
    link: str = ""
    dev: tuple[int, int] = (0, 0)
    xattrs: dict[str, bytes] = field(default_factory=dict)


_TYPES = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "chr": tarfile.CHRTYPE,
    "blk": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}


def tarinfo(e: Entry) -> tarfile.TarInfo:
    """The tar header of E (PAX: exact mtimes and xattrs, as raw bytes, in PAX records)."""
    info = tarfile.TarInfo(e.name)
    info.type = _TYPES[e.kind]
    info.mode = e.mode if e.mode is not None else (0o755 if e.kind == "dir" else 0o644)
    info.uid, info.gid = e.uid, e.gid
    info.uname = info.gname = ""
    pax: dict[str, str] = {}
    if isinstance(e.mtime, str):
        info.mtime = float(e.mtime)
        pax["mtime"] = e.mtime
    else:
        info.mtime = e.mtime
    info.linkname = e.link
    info.devmajor, info.devminor = e.dev
    info.size = len(e.data) if e.kind == "file" else 0
    for k, v in e.xattrs.items():
        pax["SCHILY.xattr." + k] = v.decode("utf-8", "surrogateescape")
    info.pax_headers = pax
    return info


def entry_of(spec: tuple | Entry) -> Entry:
    """The `Entry` a shorthand tuple (module docstring) stands for; an Entry stays itself."""
    if isinstance(spec, Entry):
        return spec
    kind, path = spec[0], spec[1]
    if kind == "dir":
        return Entry(path, "dir", mode=spec[2])
    if kind == "file":
        return Entry(path, data=spec[2], mode=spec[3], xattrs=spec[4] if len(spec) > 4 else {})
    if kind in ("link", "symlink"):
        # a hard link's mode is its target's (extractors chmod the shared inode)
        return Entry(
            path,
            "hardlink" if kind == "link" else "symlink",
            link=spec[2],
            mode=spec[3] if len(spec) > 3 else 0o777,
        )
    if kind in ("whiteout", "opaque"):
        parent, _, name = path.rpartition("/")
        wh = OPAQUE_ENTRY if kind == "opaque" else whiteout_of(name)
        target = f"{path}/{wh}" if kind == "opaque" else f"{parent}/{wh}".lstrip("/")
        return Entry(target, mode=0o644)
    raise ValueError(f"unknown layer entry {spec!r}")


def write_layer(
    fileobj: BinaryIO, entries: list[tuple] | list[Entry], fmt: int = tarfile.PAX_FORMAT
) -> None:
    """ENTRIES as an uncompressed layer tar, written to FILEOBJ."""
    with tarfile.open(
        fileobj=fileobj, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape"
    ) as tar:
        for e in map(entry_of, entries):
            tar.addfile(tarinfo(e), io.BytesIO(e.data) if e.kind == "file" else None)


def layer_tar(entries: list[tuple] | list[Entry]) -> bytes:
    """An uncompressed layer tar (PAX, so xattrs survive)."""
    buf = io.BytesIO()
    write_layer(buf, entries)
    return buf.getvalue()


def build_image(
    layers: list[list[tuple]], name: str, out: Path, cmd: list[str] | None = None
) -> dict:
    """Write an OCI image archive to OUT; returns {name, diff_ids, layer_digests}."""
    tars = [layer_tar(entries) for entries in layers]
    blobs = [gzip.compress(t, mtime=0) for t in tars]
    diff_ids = ["sha256:" + hashlib.sha256(t).hexdigest() for t in tars]
    return write_archive(blobs, diff_ids, name, out, cmd)


def write_archive(
    gzip_layers: list[bytes],
    diff_ids: list[str],
    name: str,
    out: Path,
    cmd: list[str] | None = None,
    layer_media_type: str = "application/vnd.oci.image.layer.v1.tar+gzip",
) -> dict:
    """An OCI image archive of already compressed layers (gzip, unless LAYER_MEDIA_TYPE says
    otherwise) with their diffIDs."""
    blobs = [Blob(layer_media_type, b) for b in gzip_layers]
    config = Blob(
        "application/vnd.oci.image.config.v1+json",
        json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "config": {"Cmd": cmd or ["/bin/sh"], "Env": ["PATH=/bin"]},
                "rootfs": {"type": "layers", "diff_ids": diff_ids},
            }
        ).encode(),
    )
    manifest = Blob(
        "application/vnd.oci.image.manifest.v1+json",
        json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": config.descriptor(),
                "layers": [b.descriptor() for b in blobs],
            }
        ).encode(),
    )
    index = {
        "schemaVersion": 2,
        "manifests": [
            manifest.descriptor(
                annotations={
                    "io.containerd.image.name": name,
                    "org.opencontainers.image.ref.name": name,
                }
            )
        ],
    }
    with tarfile.open(out, "w") as tar:
        for path, data in [
            ("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'),
            ("index.json", json.dumps(index).encode()),
            *((f"blobs/sha256/{b.digest[7:]}", b.data) for b in [config, manifest, *blobs]),
        ]:
            ti = tarfile.TarInfo(path)
            ti.size, ti.mtime = len(data), MTIME
            tar.addfile(ti, io.BytesIO(data))
    return {"name": name, "diff_ids": diff_ids, "layer_digests": [b.digest for b in blobs]}


def chain_ids(diff_ids: list[str]) -> list[str]:
    """containerd's chain IDs: chain[0] = diff[0]; chain[n] = sha256(chain[n-1] + " " + diff[n])."""
    chain = [diff_ids[0]]
    for d in diff_ids[1:]:
        chain.append("sha256:" + hashlib.sha256(f"{chain[-1]} {d}".encode()).hexdigest())
    return chain
