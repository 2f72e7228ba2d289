"""Tar compatibility as containerd reads layers: GNU tar's sparse formats, and the corner
cases where tar readers disagree, decided the way Go's archive/tar and containerd's applier
decide them (docs/erofs.md, "Tar formats read").

Two oracles: GNU tar itself (it wrote the archive; its extraction is the expected content)
and Go's archive/tar (`tests/gotar/main.go`, built with the system Go), whose reading of the
same bytes every image must match, entry by entry, or whose refusal ours must share.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.support import tarcraft as t
from tests.support.cli import convert, run_cli
from tests.support.helpers import mounted_erofs, require_root, require_tool

GIB = 1 << 30
SPARSE_SIZE = 2 * GIB + (1 << 20) + 12345
# (offset, length) of the data written into the sparse source file; the rest is holes.
SPARSE_RUNS = [(0, 65536), (GIB + 3 * 4096, 1 << 20), ((2 << 30) + 17, 100), (SPARSE_SIZE - 10, 10)]
SPARSE_FORMATS = {
    "gnu": ["--format=gnu"],
    "pax-0.0": ["--format=pax", "--sparse-version=0.0"],
    "pax-0.1": ["--format=pax", "--sparse-version=0.1"],
    "pax-1.0": ["--format=pax", "--sparse-version=1.0"],
}


def _write_sparse(path: Path) -> None:
    with open(path, "wb") as f:
        for i, (offset, length) in enumerate(SPARSE_RUNS):
            f.seek(offset)
            f.write(hashlib.sha256(b"%d" % i).digest() * (length // 32) + b"#" * (length % 32))
        f.truncate(SPARSE_SIZE)


def _same_contents(a: Path, b: Path) -> None:
    assert a.stat().st_size == b.stat().st_size
    piece = 16 << 20
    with open(a, "rb") as fa, open(b, "rb") as fb:
        offset = 0
        while chunk := fa.read(piece):
            assert chunk == fb.read(piece), f"{a} and {b} differ at {offset}"
            offset += len(chunk)


@pytest.mark.parametrize("fmt", SPARSE_FORMATS)
def test_gnu_tar_sparse_formats_mount_equal_to_gnu_tar_extraction(tmp_path: Path, fmt: str) -> None:
    """A 2 GiB sparse file with four data runs (one past 2^31): the kernel reads the image
    equal to what GNU tar extracts, under its own name, and holes cost no blocks."""
    require_root()
    tar = require_tool("tar")
    src = tmp_path / "src"
    src.mkdir()
    _write_sparse(src / "disk.img")
    layer = tmp_path / "sparse.tar"
    subprocess.run(
        [tar, "--sparse", *SPARSE_FORMATS[fmt], "-cf", str(layer), "-C", str(src), "disk.img"],
        check=True,
    )
    assert layer.stat().st_size < 4 << 20, "GNU tar did not write a sparse member"
    extracted = tmp_path / "extracted"
    extracted.mkdir()
    subprocess.run([tar, "-xf", str(layer), "-C", str(extracted)], check=True)
    assert os.listdir(extracted) == ["disk.img"]
    out = tmp_path / "sparse.erofs"
    result = convert(layer, out)
    assert result["size"] < 8 << 20
    with mounted_erofs(out) as mnt:
        assert os.listdir(mnt) == ["disk.img"]
        _same_contents(mnt / "disk.img", extracted / "disk.img")


# --- Go's archive/tar as the oracle --------------------------------------------------------


@pytest.fixture(scope="session")
def gotar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    go = require_tool("go")
    binary = tmp_path_factory.mktemp("gotar") / "gotar"
    env = {**os.environ, "GO111MODULE": "off", "CGO_ENABLED": "0"}
    env.setdefault("GOCACHE", str(tmp_path_factory.mktemp("gocache")))
    source = Path(__file__).parents[1] / "gotar" / "main.go"
    subprocess.run([go, "build", "-o", str(binary), str(source)], check=True, env=env)
    return binary


def go_reads(gotar: Path, layer: Path) -> tuple[list[dict], str | None]:
    """The entries Go's archive/tar reads from `layer`, and its error if it fails."""
    with open(layer, "rb") as f:
        proc = subprocess.run([str(gotar)], stdin=f, capture_output=True, text=True, check=True)
    entries = [json.loads(line) for line in proc.stdout.splitlines()]
    if entries and "error" in entries[-1]:
        return entries[:-1], entries[-1]["error"]
    return entries, None


def _sparse_by_gnu_tar(tmp_path: Path, *fmt: str) -> bytes:
    tar = require_tool("tar")
    src = tmp_path / "gsrc"
    src.mkdir(exist_ok=True)
    with open(src / "sparse", "wb") as f:
        f.write(b"head")
        f.seek(3 << 20)
        f.write(b"middle" * 1000)
        f.truncate(9 << 20)
    layer = tmp_path / "g.tar"
    subprocess.run([tar, "--sparse", *fmt, "-cf", str(layer), "-C", str(src), "sparse"], check=True)
    return layer.read_bytes()


CASES = {
    # Written by GNU tar: Go and we must read the same 9 MiB file.
    "pax sparse 0.0": lambda p: _sparse_by_gnu_tar(p, "--format=pax", "--sparse-version=0.0"),
    "pax sparse 0.1": lambda p: _sparse_by_gnu_tar(p, "--format=pax", "--sparse-version=0.1"),
    "pax sparse 1.0": lambda p: _sparse_by_gnu_tar(p, "--format=pax", "--sparse-version=1.0"),
    "old gnu sparse": lambda p: _sparse_by_gnu_tar(p, "--format=gnu"),
    # An archive that ends with a single zero block: Go reads it as complete.
    "lone zero block at the end": lambda p: t.member(b"a", b"1") + bytes(512),
    # A zero block, then more members: Go refuses (a reader that stopped at the zero block
    # would drop `b` from the layer without a word).
    "zero block in the middle": lambda p: (
        t.member(b"a", b"1") + bytes(512) + t.member(b"b", b"2") + t.end()
    ),
    # Nothing at all: Go reads an empty archive, containerd applies an empty layer.
    "zero-byte input": lambda p: b"",
    # Global headers are entries to Go; containerd's applier skips them, so they change
    # nothing: `f` keeps its own uid and mtime.
    "PAX global header": lambda p: (
        t.pax(
            [(b"uid", b"4242"), (b"mtime", b"1234567890"), (b"comment", b"global")], typeflag=b"g"
        )
        + t.member(b"f", b"data", uid=7)
    ),
    # More than 1 MiB of PAX records: Go refuses (ErrFieldTooLong).
    "oversized PAX header": lambda p: (
        t.pax([(b"comment", b"c" * (1 << 20))]) + t.member(b"f", b"x") + t.end()
    ),
    # GNU long names win over a PAX path in Go's order.
    "GNU long name after PAX path": lambda p: (
        t.pax([(b"path", b"from-pax")])
        + t.header(b"././@LongLink", typeflag=b"L", size=9)
        + t.padded(b"from-gnu\0")
        + t.member(b"short", b"x")
        + t.end()
    ),
    # An empty PAX value keeps the header's (Go: "keep the original USTAR value").
    "empty PAX path": lambda p: t.pax([(b"path", b"")]) + t.member(b"ustar-name", b"x") + t.end(),
    # Pre-POSIX directories: typeflag NUL and a trailing slash (Go reads a directory).
    "old-style directory": lambda p: (
        t.member(b"olddir/", typeflag=b"\0", mode=0o750) + t.member(b"olddir/f", b"x") + t.end()
    ),
    "negative PAX size": lambda p: t.pax([(b"size", b"-1")]) + t.member(b"f") + t.end(),
    # A sparse map on a symlink (declaring a 4 GiB file): Go refuses (ErrHeader).
    "sparse map on a symlink": lambda p: (
        t.pax(
            [
                (b"GNU.sparse.numblocks", b"1"),
                (b"GNU.sparse.map", b"0,4294967296"),
                (b"GNU.sparse.size", b"4294967296"),
            ]
        )
        + t.member(b"link", typeflag=b"2", linkname=b"target")
        + t.end()
    ),
    # The map accounts for 2 bytes, the archive stores 6: Go fails ("unreferenced data").
    "sparse data the map does not use": lambda p: (
        t.pax(
            [
                (b"GNU.sparse.major", b"1"),
                (b"GNU.sparse.minor", b"0"),
                (b"GNU.sparse.name", b"s"),
                (b"GNU.sparse.realsize", b"100"),
            ]
        )
        + t.member(b"GNUSparseFile.0/s", t.padded(b"1\n0\n2\n") + b"abcdef")
        + t.end()
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_reads_what_go_archive_tar_reads(tmp_path: Path, gotar: Path, case: str) -> None:
    require_root()
    layer = tmp_path / "layer.tar"
    layer.write_bytes(CASES[case](tmp_path))
    entries, go_error = go_reads(gotar, layer)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = run_cli("convert", layer, out_dir / "l.erofs", check=False)
    if go_error is not None:
        assert proc.returncode != 0, f"Go refuses ({go_error}), we accepted"
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
        assert list(out_dir.iterdir()) == []
        return
    assert proc.returncode == 0, f"Go reads it, we refused: {proc.stderr}"
    files = [e for e in entries if e["typeflag"] != "g"]
    with mounted_erofs(out_dir / "l.erofs") as mnt:
        names = sorted(str(p.relative_to(mnt)) for p in mnt.rglob("*"))
        assert names == sorted(e["name"].strip("/").removeprefix("./") for e in files)
        for e in files:
            path = mnt / e["name"].removeprefix("./")
            st = path.lstat()
            assert (st.st_uid, st.st_gid, st.st_mode & 0o7777, int(st.st_mtime)) == (
                e["uid"],
                e["gid"],
                e["mode"] & 0o7777,
                e["mtime"],
            ), e["name"]
            if e["typeflag"] == "5":
                assert stat.S_ISDIR(st.st_mode), e["name"]
                continue
            assert stat.S_ISREG(st.st_mode) and st.st_size == e["size"], e["name"]
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                while piece := f.read(1 << 20):
                    digest.update(piece)
            assert digest.hexdigest() == e["sha256"], e["name"]


# --- Decisions where containerd's applier has none to copy ---------------------------------


def _refused(tmp_path: Path, tar: bytes, message: str) -> None:
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    layer = work / "bad.tar"
    layer.write_bytes(tar)
    out_dir = work / "out"
    out_dir.mkdir()
    proc = run_cli("convert", layer, out_dir / "bad.erofs", check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert message in proc.stderr
    assert list(out_dir.iterdir()) == []


def test_bad_base64_in_libarchive_xattr_is_refused(tmp_path: Path) -> None:
    """bsdtar writes xattrs as base64; text that is not base64 is a corrupt layer, not an
    xattr to guess (Python's lenient decoder turned `!!!!` into an empty value)."""
    _refused(
        tmp_path,
        t.pax([(b"LIBARCHIVE.xattr.user.k", b"!!!!")]) + t.member(b"f", b"x") + t.end(),
        "bad base64",
    )


def test_libarchive_xattr_is_kept(tmp_path: Path) -> None:
    require_root()
    layer = tmp_path / "l.tar"
    layer.write_bytes(
        t.pax([(b"LIBARCHIVE.xattr.user.k", b"dmFsdWU")]) + t.member(b"f", b"x") + t.end()
    )
    out = tmp_path / "l.erofs"
    convert(layer, out)
    with mounted_erofs(out) as mnt:
        assert os.getxattr(mnt / "f", "user.k") == b"value"


def test_symlink_targets_up_to_path_max(tmp_path: Path) -> None:
    """Linux's symlink(2) takes at most 4095 bytes: that many works, one more is refused."""
    require_root()
    target = b"d/" * 2047 + b"x"  # 4095 bytes
    layer = tmp_path / "l.tar"
    layer.write_bytes(t.pax([(b"linkpath", target)]) + t.member(b"link", typeflag=b"2") + t.end())
    out = tmp_path / "l.erofs"
    convert(layer, out)
    with mounted_erofs(out) as mnt:
        assert os.readlink(mnt / "link").encode() == target
    _refused(
        tmp_path,
        t.pax([(b"linkpath", target + b"y")]) + t.member(b"link", typeflag=b"2") + t.end(),
        "4096 bytes",
    )
    _refused(tmp_path, t.member(b"link", typeflag=b"2") + t.end(), "empty symlink target")


def test_device_numbers_up_to_what_dev_t_holds(tmp_path: Path) -> None:
    """Major 4095 and minor 1048575 are the largest EROFS (new_encode_dev) stores; the
    kernel must give back exactly those. 4096 is refused (it would encode as 0:0 + 256)."""
    require_root()
    layer = tmp_path / "l.tar"
    layer.write_bytes(
        t.member(b"blk", typeflag=b"4", devmajor=4095, devminor=1048575)
        + t.member(b"chr", typeflag=b"3", devmajor=1, devminor=3)
        + t.end()
    )
    out = tmp_path / "l.erofs"
    convert(layer, out)
    with mounted_erofs(out) as mnt:
        st = os.lstat(mnt / "blk")
        assert stat.S_ISBLK(st.st_mode)
        assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (4095, 1048575)
        st = os.lstat(mnt / "chr")
        assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (1, 3)
    _refused(tmp_path, t.member(b"blk", typeflag=b"4", devmajor=4096) + t.end(), "4096:0")
    _refused(tmp_path, t.member(b"chr", typeflag=b"3", devminor=1 << 20) + t.end(), "0:1048576")


def test_zero_byte_input_is_an_empty_layer(tmp_path: Path) -> None:
    require_root()
    layer = tmp_path / "empty.tar"
    layer.write_bytes(b"")
    out = tmp_path / "empty.erofs"
    result = convert(layer, out)
    assert result["diff_id"] == "sha256:" + hashlib.sha256(b"").hexdigest()
    assert result["entries"] == 0
    with mounted_erofs(out) as mnt:
        assert os.listdir(mnt) == []
        assert stat.S_IMODE(os.stat(mnt).st_mode) == 0o755


def test_members_after_a_replaced_directory_go_where_the_replacement_says(tmp_path: Path) -> None:
    """A directory replaced later in the layer (by a whiteout, a file, a symlink, a hardlink)
    is gone for the members after it, however their names spell the path (`./`, doubled
    slashes): the import finds parents by path, and must not find the old directory."""
    require_root()
    d = {"typeflag": b"5", "mode": 0o755}
    tar = (
        t.member(b"./", **d)
        + t.member(b"./a/", **d)
        + t.member(b"./a/b/", **d)
        + t.member(b"./a/b/old", b"below the whiteout")
        + t.member(b"./.wh.a")
        + t.member(b"./a/b/new", b"after the whiteout")  # implicit a (opaque) and a/b
        + t.member(b"e", b"a file first")
        + t.member(b"e/", **d)
        + t.member(b"./e/k", b"in the directory over the file")
        + t.member(b"f/", **d)
        + t.member(b"f/gone", b"x")
        + t.member(b"f/", **d)  # a directory over a directory: attributes only
        + t.member(b"f//kept", b"y")
        + t.end()
    )
    layer = tmp_path / "l.tar"
    layer.write_bytes(tar)
    out = tmp_path / "l.erofs"
    convert(layer, out)
    with mounted_erofs(out) as mnt:
        assert sorted(os.listdir(mnt)) == ["a", "e", "f"]
        assert os.listdir(mnt / "a/b") == ["new"]
        assert (mnt / "a/b/new").read_bytes() == b"after the whiteout"
        assert os.getxattr(mnt / "a", "trusted.overlay.opaque") == b"y"
        assert os.listdir(mnt / "e") == ["k"]
        assert sorted(os.listdir(mnt / "f")) == ["gone", "kept"]
    for replacement, message in [
        (t.member(b"./r", b"a file now"), "path component 'r' is not a directory"),
        (t.member(b"r", typeflag=b"2", linkname=b"t"), "path component 'r' is a symlink"),
        (
            t.member(b"t", b"target") + t.member(b"./r", typeflag=b"1", linkname=b"t"),
            "path component 'r' is not a directory",
        ),
    ]:
        _refused(
            tmp_path,
            t.member(b"r/", **d)
            + t.member(b"r/x", b"1")
            + replacement
            + t.member(b"r/y", b"2")
            + t.end(),
            message,
        )
