"""Building layer tars for tests, in the layer-spec language of the demo's OCI archives
(`Entry`, shim_integration.testbed.oci_archive), and the layers the tests share."""

from __future__ import annotations

import io
import os
import random
import subprocess
import tarfile
from pathlib import Path

from isal import igzip

from shim_integration.testbed.oci_archive import Entry, write_layer
from snapshotter.ingest.convert import convert_layer


def write_tar(path: Path, entries: list[Entry], fmt: int = tarfile.PAX_FORMAT) -> Path:
    with open(path, "wb") as f:
        write_layer(f, entries, fmt)
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
        [
            "tar",
            "--xattrs",
            "--xattrs-include=*",
            "--same-owner",
            "-p",
            "--numeric-owner",
            "-xf",
            str(tar_path),
            "-C",
            str(dest),
        ],
        check=True,
        capture_output=True,
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


def _sized(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def awkward_entries() -> list[Entry]:
    """One layer with every kind of entry and the edge cases of each (long names and links,
    hard links, devices, wide owners, xattrs, a rewritten path, holes)."""
    long_dir = "d" * 120 + "/" + "e" * 100
    entries = [
        Entry("./", "dir", mode=0o755, mtime=1_600_000_000),
        Entry("etc", "dir", mode=0o755),
        Entry("etc/hostname", data=b"box\n"),
        Entry("etc/dup", data=b"first version\n"),
        Entry("sizes", "dir", mode=0o750, uid=1000, gid=1000),
        Entry("tmp", "dir", mode=0o1777),
        Entry("bin", "dir"),
        Entry("bin/tool", data=b"\x7fELF" + _sized(9000, 1), mode=0o4755),
        Entry("bin/tool-link", "hardlink", link="bin/tool"),
        Entry("etc/tool-link2", "hardlink", link="./bin/tool"),
        Entry("bin/sh", "symlink", link="/bin/busybox"),
        Entry("bin/rel", "symlink", link="../etc/hostname"),
        Entry("bin/longlink", "symlink", link="x/" * 150 + "end"),
        Entry("d" * 120, "dir", mode=0o700),
        Entry(long_dir, "dir"),
        Entry(long_dir + "/" + "f" * 200, data=b"deep\n"),
        Entry("dev", "dir"),
        Entry("dev/null", "chr", dev=(1, 3), mode=0o666),
        Entry("dev/sda1", "blk", dev=(8, 1), mode=0o660, gid=6),
        Entry("dev/bigminor", "chr", dev=(240, 70000), mode=0o600),
        Entry("dev/fifo", "fifo", mode=0o600),
        Entry("owners", "dir", uid=100000, gid=200000),
        Entry("owners/wide", data=b"w", uid=70000, gid=65536),
        Entry("owners/ns", data=b"ns", mtime="1700000000.123456789"),
        Entry("owners/old", data=b"old", mtime=0),
        Entry("xattrs", "dir", xattrs={"trusted.dirattr": b"on dir"}),
        Entry(
            "xattrs/user",
            data=b"u",
            xattrs={"user.comment": b"hello", "user.shared": b"same value"},
        ),
        Entry(
            "xattrs/cap",
            data=b"c",
            mode=0o755,
            xattrs={
                "security.capability": bytes.fromhex("0100000200200000000000000000000000000000"),
                "user.shared": b"same value",
            },
        ),
        Entry(
            "xattrs/shared3",
            data=b"s",
            xattrs={"user.shared": b"same value", "user.big": b"v" * 1500},
        ),
        Entry("naïve-ünïcode", data=b"utf8 name"),
        Entry("etc/dup", data=b"second version wins\n", mode=0o600),
        Entry("sparse", data=b"a" + bytes(300_000) + b"z"),
        Entry("zeros", data=bytes(256 * 1024)),
    ]
    for i, n in enumerate(
        [0, 1, 511, 512, 513, 4095, 4096, 4097, 8191, 8192, 65535, 65536, 65537, 131072 + 17]
    ):
        entries.append(Entry(f"sizes/f{n}", data=_sized(n, i)))
    return entries


# Three layers over each other with every overlay case: whiteouts, an opaque dir, a dir
# replaced by a file and a file by a dir, a hard link broken by its replacement, xattrs
# merged.
IMAGE_LAYERS = [
    [
        Entry("./", "dir"),
        Entry("etc", "dir"),
        Entry("etc/a", data=b"a1"),
        Entry("etc/b", data=b"b" * 9000),
        Entry("etc/sub", "dir"),
        Entry("etc/sub/deep", data=b"deep"),
        Entry("var", "dir"),
        Entry("var/cache", "dir"),
        Entry("var/cache/old", data=b"o"),
        Entry("var/keep", data=b"k"),
        Entry("dir2file", "dir"),
        Entry("dir2file/inner", data=b"i"),
        Entry("file2dir", data=b"f"),
        Entry("hard1", data=b"hard" * 2000),
        Entry("hard2", "hardlink", link="hard1"),
        Entry("bin", "dir"),
        Entry("bin/busybox", data=b"\x7fELF" * 5000, mode=0o755),
        Entry("bin/sh", "symlink", link="busybox"),
        Entry("x", "dir", xattrs={"user.lower": b"1"}),
        Entry("sparse", data=b"s" + bytes(1 << 20) + b"e"),
    ],
    [
        Entry("etc", "dir", mode=0o700, uid=5),
        Entry("etc/.wh.a"),
        Entry("etc/c", data=b"c2"),
        Entry("var", "dir"),
        Entry("var/cache", "dir"),
        Entry("var/cache/.wh..wh..opq"),
        Entry("var/cache/new", data=b"n"),
        Entry("dir2file", data=b"now a file"),
        Entry("file2dir", "dir"),
        Entry("file2dir/inside", data=b"in"),
        Entry("hard1", data=b"replaced"),
        Entry("x", "dir", xattrs={"user.upper": b"2", "security.capability": b"\1" * 20}),
        Entry("deep", "dir"),
        Entry("deep/" + "/".join(["d"] * 30), "dir"),
    ],
    [
        Entry("etc", "dir", mode=0o750),
        Entry("etc/sub", "dir"),
        Entry("etc/sub/.wh.deep"),
        Entry("etc/a", data=b"a3 back"),
        Entry(".wh.bin"),
        Entry("bin", "dir"),
        Entry("bin/new", data=b"n3"),
        Entry("links", "dir"),
        Entry("links/l1", data=b"L" * 5000),
        Entry("links/l2", "hardlink", link="links/l1"),
    ],
]


def build_layers(tmp: Path, specs: list[list[Entry]]) -> list[Path]:
    """Each spec written as a tar and converted (with verity) to TMP/layer<i>.erofs."""
    paths = []
    for i, entries in enumerate(specs):
        tar = write_tar(tmp / f"layer{i}.tar", entries)
        out = tmp / f"layer{i}.erofs"
        convert_layer(tar, out, verity=True)
        paths.append(out)
    return paths
