"""Small OCI image archives (for `ctr images import`) from layer specs, in Python: the demo's image
and the containerd tests' images.

A layer is a list of entries: ("dir", path, mode), ("file", path, data, mode), ("link", path,
target, mode) for hard links, ("symlink", path, target), ("whiteout", path) and ("opaque", dir);
("file", ...) may carry xattrs as a 5th item (dict name -> bytes, written as PAX SCHILY.xattr).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

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
        return {"mediaType": self.media_type, "digest": self.digest, "size": len(self.data),
                **extra}


def _info(path: str, kind: bytes, mode: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(path)
    ti.type, ti.mode, ti.mtime, ti.uid, ti.gid = kind, mode, MTIME, 0, 0
    return ti


def layer_tar(entries: list[tuple]) -> bytes:
    """An uncompressed layer tar (PAX, so xattrs survive)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            kind, path = entry[0], entry[1]
            if kind == "dir":
                tar.addfile(_info(path, tarfile.DIRTYPE, entry[2]))
            elif kind == "file":
                ti = _info(path, tarfile.REGTYPE, entry[3])
                ti.size = len(entry[2])
                if len(entry) > 4:
                    ti.pax_headers = {f"SCHILY.xattr.{k}": v.decode("latin-1")
                                      for k, v in entry[4].items()}
                tar.addfile(ti, io.BytesIO(entry[2]))
            elif kind in ("link", "symlink"):
                # a hard link's mode is its target's (extractors chmod the shared inode)
                mode = entry[3] if len(entry) > 3 else 0o777
                ti = _info(path, tarfile.LNKTYPE if kind == "link" else tarfile.SYMTYPE, mode)
                ti.linkname = entry[2]
                tar.addfile(ti)
            elif kind in ("whiteout", "opaque"):
                parent, _, name = path.rpartition("/")
                wh = OPAQUE_ENTRY if kind == "opaque" else whiteout_of(name)
                target = f"{path}/{wh}" if kind == "opaque" else f"{parent}/{wh}".lstrip("/")
                tar.addfile(_info(target, tarfile.REGTYPE, 0o644), io.BytesIO(b""))
            else:
                raise ValueError(f"unknown layer entry {entry!r}")
    return buf.getvalue()


def build_image(layers: list[list[tuple]], name: str, out: Path,
                cmd: list[str] | None = None) -> dict:
    """Write an OCI image archive to OUT; returns {name, diff_ids, layer_digests}."""
    tars = [layer_tar(entries) for entries in layers]
    blobs = [gzip.compress(t, mtime=0) for t in tars]
    diff_ids = ["sha256:" + hashlib.sha256(t).hexdigest() for t in tars]
    return write_archive(blobs, diff_ids, name, out, cmd)


def write_archive(gzip_layers: list[bytes], diff_ids: list[str], name: str, out: Path,
                  cmd: list[str] | None = None) -> dict:
    """An OCI image archive of already compressed (gzip) layers with their diffIDs."""
    blobs = [Blob("application/vnd.oci.image.layer.v1.tar+gzip", b) for b in gzip_layers]
    config = Blob("application/vnd.oci.image.config.v1+json", json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": cmd or ["/bin/sh"], "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }).encode())
    manifest = Blob("application/vnd.oci.image.manifest.v1+json", json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config.descriptor(), "layers": [b.descriptor() for b in blobs],
    }).encode())
    index = {"schemaVersion": 2, "manifests": [manifest.descriptor(annotations={
        "io.containerd.image.name": name, "org.opencontainers.image.ref.name": name})]}
    with tarfile.open(out, "w") as tar:
        for path, data in [("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'),
                           ("index.json", json.dumps(index).encode()),
                           *((f"blobs/sha256/{b.digest[7:]}", b.data)
                             for b in [config, manifest, *blobs])]:
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
