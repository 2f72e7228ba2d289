"""Building layer tars for tests: a small spec language over Python's tarfile."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from isal import igzip


@dataclass
class Entry:
    """One tar member. `kind`: file, dir, symlink, hardlink, chr, blk, fifo."""

    name: str
    kind: str = "file"
    data: bytes = b""
    mode: int | None = None
    uid: int = 0
    gid: int = 0
    mtime: float | str = 1_700_000_000
    link: str = ""
    dev: tuple[int, int] = (0, 0)
    xattrs: dict[str, bytes] = field(default_factory=dict)


_TYPES = {
    "file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE, "chr": tarfile.CHRTYPE, "blk": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}


def tarinfo(e: Entry) -> tarfile.TarInfo:
    info = tarfile.TarInfo(e.name)
    info.type = _TYPES[e.kind]
    info.mode = e.mode if e.mode is not None else (0o755 if e.kind == "dir" else 0o644)
    info.uid, info.gid = e.uid, e.gid
    info.uname = info.gname = ""
    if isinstance(e.mtime, str):  # an exact PAX mtime, e.g. "1700000000.123456789"
        info.mtime = float(e.mtime)
        info.pax_headers["mtime"] = e.mtime
    else:
        info.mtime = e.mtime
    info.linkname = e.link
    info.devmajor, info.devminor = e.dev
    info.size = len(e.data) if e.kind == "file" else 0
    for k, v in e.xattrs.items():
        info.pax_headers["SCHILY.xattr." + k] = v.decode("utf-8", "surrogateescape")
    return info


def write_tar(path: Path, entries: list[Entry], fmt: int = tarfile.PAX_FORMAT) -> Path:
    with tarfile.open(path, "w", format=fmt, encoding="utf-8", errors="surrogateescape") as tar:
        for e in entries:
            tar.addfile(tarinfo(e), io.BytesIO(e.data) if e.kind == "file" else None)
    return path


def compress(tar_path: Path, how: str) -> Path:
    """gzip (ISA-L, level 1) or zstd (the zstd tool) next to the tar."""
    if how == "gzip":
        out = tar_path.with_name(tar_path.name + ".gz")
        with open(tar_path, "rb") as src, igzip.open(out, "wb", compresslevel=1) as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        return out
    if how == "zstd":
        out = tar_path.with_name(tar_path.name + ".zst")
        subprocess.run(["zstd", "-q", "-f", "-1", str(tar_path), "-o", str(out)], check=True)
        return out
    raise ValueError(how)


def extract_with_gnu_tar(tar_path: Path, dest: Path) -> None:
    """The reference unpacker: GNU tar as root, keeping owners, modes, xattrs and mtimes."""
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["tar", "--xattrs", "--xattrs-include=*", "--same-owner", "-p", "--numeric-owner",
         "-xf", str(tar_path), "-C", str(dest)],
        check=True, capture_output=True,
    )
    # GNU tar restores a directory's mtime when it leaves it in archive order, and later
    # members (delayed symlinks, hardlinks, files listed later) touch it again. An unpacker
    # that applies a layer sets directory times last; do that here.
    dir_times: dict[str, int] = {}
    with tarfile.open(tar_path) as tar:
        for info in tar:
            if info.isdir():
                text = info.pax_headers.get("mtime")
                ns = _pax_ns(text) if text else int(info.mtime) * 1_000_000_000
                dir_times[info.name.rstrip("/") or "."] = ns
    for name, ns in dir_times.items():
        os.utime(dest / name, ns=(ns, ns), follow_symlinks=False)


def _pax_ns(text: str) -> int:
    sec, _, frac = text.partition(".")
    return int(sec) * 1_000_000_000 + int((frac + "000000000")[:9])


def gzip_tar(files: dict[str, bytes]) -> bytes:
    """A gzip'd PAX tar of regular FILES (name -> content), mtime 1: a small real layer."""
    import gzip

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            entry = tarfile.TarInfo(name)
            entry.size, entry.mtime = len(data), 1
            tar.addfile(entry, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), mtime=0)
