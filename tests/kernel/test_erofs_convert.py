"""Layer conversion checked by the host kernel: every image is mounted (`mount -t erofs -o
loop`) and compared entry by entry with the same tar unpacked by GNU tar."""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from snapshotter.erofs.reader import ErofsImage
from tests.support.cli import convert, run_cli
from tests.support.helpers import mounted_erofs, require_root, require_tool
from tests.support.layers import (
    Entry,
    awkward_entries,
    compress,
    extract_with_gnu_tar,
    write_tar,
)
from tests.support.treecompare import diff_views, hardlink_groups, tree_view


@pytest.fixture(scope="module")
def awkward_tar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tar(tmp_path_factory.mktemp("awkward") / "layer.tar", awkward_entries())


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
@pytest.mark.parametrize("block_size", [4096, 512])
def test_awkward_layer_mounts_equal_to_gnu_tar(
    awkward_tar: Path, tmp_path: Path, compression: str, block_size: int
) -> None:
    require_root()
    layer = awkward_tar if compression == "none" else compress(awkward_tar, compression)
    out = tmp_path / "layer.erofs"
    result = convert(layer, out, "--block-size", str(block_size))
    assert result["diff_id"] == "sha256:" + hashlib.sha256(awkward_tar.read_bytes()).hexdigest()
    assert result["compression"] == compression
    assert out.stat().st_size == result["size"]

    ref = tmp_path / "ref"
    extract_with_gnu_tar(awkward_tar, ref)
    with mounted_erofs(out) as mnt:
        got, want = tree_view(mnt), tree_view(ref)
        assert diff_views(got, want) == []
        assert hardlink_groups(mnt) == hardlink_groups(ref)
        assert os.stat(mnt / "bin/tool").st_nlink == 3
    assert not list(tmp_path.glob(".layer.erofs*")), "temporary file left behind"


def test_same_layer_same_bytes_whatever_the_compression(awkward_tar: Path, tmp_path: Path) -> None:
    images = []
    for i, how in enumerate(["none", "gzip", "zstd", "none"]):
        layer = awkward_tar if how == "none" else compress(awkward_tar, how)
        out = tmp_path / f"img{i}.erofs"
        convert(layer, out)
        images.append(out.read_bytes())
    assert all(img == images[0] for img in images)


def test_holes_cost_no_blocks(tmp_path: Path) -> None:
    size = 64 << 20
    entries = [Entry("big-hole", data=b"head" + bytes(size) + b"tail")]
    layer = compress(write_tar(tmp_path / "l.tar", entries), "gzip")
    result = convert(layer, tmp_path / "l.erofs")
    assert result["size"] < 1 << 20
    with ErofsImage(tmp_path / "l.erofs") as img:
        info = img.lookup("big-hole")
        assert info.size == size + 8
        assert sum(1 for ref in img.data_map(info) if ref.blkaddr is None) >= 1000
        data = img.read(info)
        assert data[:4] == b"head" and data[-4:] == b"tail" and data.count(0) == size


def test_whiteouts_and_opaque_dirs_as_overlayfs_reads_them(tmp_path: Path) -> None:
    require_root()
    entries = [
        Entry("etc", "dir"),
        Entry("etc/.wh.removed", mode=0o600),
        Entry("etc/kept", data=b"k"),
        Entry("var", "dir"),
        Entry("var/cache", "dir"),
        Entry("var/cache/.wh..wh..opq"),
        Entry("var/cache/new", data=b"n"),
        Entry("implicit/.wh..wh..opq"),
        Entry(".wh.toplevel"),
        Entry("etc/.wh..wh.plnk", "dir"),
        Entry("etc/.wh..wh.plnk/1234.5678", data=b"aufs hardlink store"),
        Entry(".wh.redone"),
        Entry("redone", "dir"),
        Entry("redone/new", data=b"r"),
        Entry(".wh.implied"),
        Entry("implied/new", data=b"i"),
    ]
    layer = write_tar(tmp_path / "l.tar", entries)
    out = tmp_path / "l.erofs"
    convert(layer, out)
    with mounted_erofs(out) as mnt:
        for path in ["etc/removed", "toplevel"]:
            st = os.lstat(mnt / path)
            assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0, path
        assert stat.S_IMODE(os.lstat(mnt / "etc/removed").st_mode) == 0o600
        assert os.getxattr(mnt / "var/cache", "trusted.overlay.opaque") == b"y"
        assert os.getxattr(mnt / "implicit", "trusted.overlay.opaque") == b"y"
        assert os.getxattr(mnt / "etc", "trusted.overlay.origin") == b""
        assert os.getxattr(mnt, "trusted.overlay.origin") == b""
        assert sorted(os.listdir(mnt / "var/cache")) == ["new"]
        # Deleted, then recreated in the same layer: the new directory hides the old one.
        for path in ["redone", "implied"]:
            assert os.getxattr(mnt / path, "trusted.overlay.opaque") == b"y", path
        assert sorted(os.listdir(mnt / "etc")) == ["kept", "removed"]
        # No ./ entry: the root gets fixed, documented attributes.
        st = os.stat(mnt)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o755, 0, 0)
        assert st.st_mtime == 1_700_000_000  # the layer's most common mtime


def test_directory_of_50k_entries(tmp_path: Path) -> None:
    require_root()
    names = [f"entry-{i:06d}-{'x' * (i % 37)}" for i in range(50_000)]
    layer = tmp_path / "wide.tar"
    with tarfile.open(layer, "w", format=tarfile.PAX_FORMAT) as tar:
        d = tarfile.TarInfo("wide")
        d.type = tarfile.DIRTYPE
        d.mode = 0o755
        tar.addfile(d)
        for name in names:
            info = tarfile.TarInfo("wide/" + name)
            info.type = tarfile.SYMTYPE
            info.linkname = name[::-1]
            tar.addfile(info)
    out = tmp_path / "wide.erofs"
    result = convert(layer, out)
    assert result["entries"] == 50_001
    with mounted_erofs(out) as mnt:
        assert sorted(os.listdir(mnt / "wide")) == sorted(names)
        for name in random.Random(7).sample(names, 200):  # lookups binary-search the blocks
            assert os.readlink(mnt / "wide" / name) == name[::-1]


def test_gnu_format_long_names_and_links(tmp_path: Path) -> None:
    require_root()
    entries = [
        Entry("a" * 150, "dir"),
        Entry("a" * 150 + "/" + "b" * 150, data=b"gnu longname"),
        Entry("l" * 120, "symlink", link="t" * 200),
        Entry("h" * 130, "hardlink", link="a" * 150 + "/" + "b" * 150),
    ]
    layer = write_tar(tmp_path / "gnu.tar", entries, fmt=tarfile.GNU_FORMAT)
    out = tmp_path / "gnu.erofs"
    convert(layer, out)
    ref = tmp_path / "ref"
    extract_with_gnu_tar(layer, ref)
    with mounted_erofs(out) as mnt:
        got, want = tree_view(mnt), tree_view(ref)
        del got["."], want["."]  # no ./ entry: the roots differ by design
        assert diff_views(got, want) == []


def test_member_larger_than_4gib(tmp_path: Path) -> None:
    """Needs an extended inode (64-bit size); zeros keep the tar.gz and the image small."""
    require_root()
    size = (4 << 30) + 4096 * 3 + 123
    layer = tmp_path / "huge.tar.gz"
    marks = {0: b"start", 1 << 31: b"middle", size - 3: b"end"}
    _write_huge_layer(layer, size, marks)
    out = tmp_path / "huge.erofs"
    result = convert(layer, out)
    assert result["size"] < 16 << 20
    with mounted_erofs(out) as mnt:
        path = mnt / "huge"
        assert path.stat().st_size == size
        with open(path, "rb") as f:
            for offset, mark in marks.items():
                f.seek(offset)
                assert f.read(len(mark)) == mark
            f.seek(3 << 30)
            assert f.read(1 << 20) == bytes(1 << 20)


def _write_huge_layer(path: Path, size: int, marks: dict[int, bytes]) -> None:
    from isal import igzip

    info = tarfile.TarInfo("huge")
    info.size = size
    info.mode = 0o644
    header = info.tobuf(format=tarfile.PAX_FORMAT)
    zero = bytes(1 << 20)
    with igzip.open(path, "wb", compresslevel=0) as gz:
        gz.write(header)
        pos = 0
        for offset in sorted(marks):
            while pos + len(zero) <= offset:
                gz.write(zero)
                pos += len(zero)
            gz.write(bytes(offset - pos) + marks[offset])
            pos = offset + len(marks[offset])
        while pos < size:
            n = min(len(zero), size - pos)
            gz.write(zero[:n])
            pos += n
        gz.write(bytes(-size % 512) + bytes(1024))


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([Entry("/etc/passwd", data=b"x")], "absolute member name"),
        ([Entry("a/../../etc/passwd", data=b"x")], "contains '..'"),
        ([Entry("link", "hardlink", link="missing")], "hardlink to missing"),
        ([Entry("link", "hardlink", link="../outside")], "contains '..'"),
        ([Entry("link", "hardlink", link="/etc/shadow")], "absolute member name"),
        ([Entry("d", "dir"), Entry("h", "hardlink", link="d")], "hardlink to a directory"),
        ([Entry("esc", "symlink", link="/etc"), Entry("esc/passwd", data=b"x")], "is a symlink"),
        ([Entry("f", data=b"x"), Entry("f/g", data=b"y")], "not a directory"),
        ([Entry("nobody", data=b"x", uid=2**32 - 1)], "not a valid Linux id"),
    ],
)
def test_hostile_tars_are_refused_and_leave_nothing(
    tmp_path: Path, entries: list[Entry], message: str
) -> None:
    layer = write_tar(tmp_path / "bad.tar", entries)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = run_cli("convert", layer, out_dir / "bad.erofs", check=False)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize("how", ["gzip", "zstd", "none"])
def test_truncated_layers_are_refused(awkward_tar: Path, tmp_path: Path, how: str) -> None:
    layer = awkward_tar if how == "none" else compress(awkward_tar, how)
    cut = tmp_path / ("cut." + how)
    data = layer.read_bytes()
    cut.write_bytes(data[: len(data) * 2 // 3])
    proc = run_cli("convert", cut, tmp_path / "out.erofs", check=False)
    assert proc.returncode != 0
    assert "truncated" in proc.stderr or "unexpected end" in proc.stderr, proc.stderr
    assert not (tmp_path / "out.erofs").exists()
    assert not list(tmp_path.glob(".out.erofs*"))


def test_corrupt_gzip_is_refused(awkward_tar: Path, tmp_path: Path) -> None:
    data = bytearray(compress(awkward_tar, "gzip").read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(bytes(data))
    proc = run_cli("convert", bad, tmp_path / "out.erofs", check=False)
    assert proc.returncode != 0 and "gzip" in proc.stderr
    assert not (tmp_path / "out.erofs").exists()


def test_diff_id_is_checked(awkward_tar: Path, tmp_path: Path) -> None:
    good = "sha256:" + hashlib.sha256(awkward_tar.read_bytes()).hexdigest()
    convert(awkward_tar, tmp_path / "ok.erofs", "--diff-id", good)
    wrong = "sha256:" + "0" * 64
    proc = run_cli("convert", awkward_tar, tmp_path / "bad.erofs", "--diff-id", wrong, check=False)
    assert proc.returncode != 0 and "diffID mismatch" in proc.stderr
    assert not (tmp_path / "bad.erofs").exists()


def test_reader_sees_what_the_kernel_sees(awkward_tar: Path, tmp_path: Path) -> None:
    require_root()
    out = tmp_path / "layer.erofs"
    convert(awkward_tar, out)
    with mounted_erofs(out) as mnt, ErofsImage(out) as img:
        for path, info in img.walk():
            rel = path.decode("utf-8", "surrogateescape") or "."
            st = os.lstat(mnt / rel)
            assert (st.st_mode, st.st_uid, st.st_gid) == (
                info.mode,
                info.inode.uid,
                info.inode.gid,
            ), rel
            if stat.S_ISREG(st.st_mode):
                assert img.read(info) == (mnt / rel).read_bytes(), rel
            elif stat.S_ISLNK(st.st_mode):
                assert img.readlink(info) == os.readlink(os.fsencode(mnt / rel)), rel
            if rel != ".":
                names = (
                    {os.fsencode(n) for n in os.listdir(mnt / rel)}
                    if stat.S_ISDIR(st.st_mode)
                    else None
                )
                if names is not None:
                    assert names == {n for n, _, _ in img.listdir(info)} - {b".", b".."}


def test_reader_reads_mkfs_erofs_images(tmp_path: Path) -> None:
    """Debian's mkfs.erofs 1.5 builds from a directory; our reader must read its images."""
    require_root()
    mkfs = require_tool("mkfs.erofs")
    src = tmp_path / "src"
    extract_with_gnu_tar(write_tar(tmp_path / "l.tar", awkward_entries()), src)
    for args in ([], ["-Enoinline_data"]):
        img_path = tmp_path / "mkfs.erofs"
        subprocess.run(
            [mkfs, "-x", "1", *args, str(img_path), str(src)], check=True, capture_output=True
        )
        with ErofsImage(img_path) as img:
            seen = {}
            for path, info in img.walk():
                rel = path.decode("utf-8", "surrogateescape") or "."
                seen[rel] = info
                st = os.lstat(src / rel)
                assert stat.S_IFMT(st.st_mode) == stat.S_IFMT(info.mode), rel
                if stat.S_ISREG(st.st_mode):
                    assert img.read(info) == (src / rel).read_bytes(), rel
                if rel == "xattrs/user":
                    assert img.xattrs(info)[b"user.comment"] == b"hello"
            assert set(seen) == set(tree_view(src))


def test_fsck_erofs_accepts_our_images(awkward_tar: Path, tmp_path: Path) -> None:
    fsck = require_tool("fsck.erofs")
    out = tmp_path / "layer.erofs"
    convert(awkward_tar, out)
    proc = subprocess.run([fsck, "--extract", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_verity_tree_is_accepted_by_veritysetup(awkward_tar: Path, tmp_path: Path) -> None:
    veritysetup = require_tool("veritysetup")
    diff_id = "sha256:" + hashlib.sha256(awkward_tar.read_bytes()).hexdigest()
    results = []
    for i, extra in enumerate([[], ["--diff-id", diff_id]]):  # re-read pass vs single pass
        out = tmp_path / f"v{i}.erofs"
        result = convert(awkward_tar, out, "--verity", *extra)
        v = result["verity"]
        assert v["hash_offset"] == result["size"]
        proc = subprocess.run(
            [
                veritysetup,
                "verify",
                str(out),
                str(out),
                v["root_hash"],
                f"--hash-offset={v['hash_offset']}",
            ],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr
        results.append((out.read_bytes(), v["root_hash"]))
    assert results[0] == results[1], "the same layer must get the same tree either way"
    data = bytearray(results[0][0])
    data[4096 * 3 + 5] ^= 1  # one flipped bit in the first file's data
    bad = tmp_path / "bad.erofs"
    bad.write_bytes(bytes(data))
    proc = subprocess.run(
        [
            veritysetup,
            "verify",
            str(bad),
            str(bad),
            results[0][1],
            f"--hash-offset={v['hash_offset']}",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0


def test_directory_source_keeps_whiteouts_hardlinks_and_xattrs(
    awkward_tar: Path, tmp_path: Path
) -> None:
    require_root()
    from snapshotter.ingest.convert import convert_directory

    src = tmp_path / "upper"
    extract_with_gnu_tar(awkward_tar, src)
    os.mknod(src / "etc/whiteout", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    os.setxattr(src / "sizes", "trusted.overlay.opaque", b"y")
    os.mkfifo(src / "dev/fifo2")
    sock_parent = src / "run"
    sock_parent.mkdir()
    import socket

    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(sock_parent / "sock"))
    want = tree_view(src)
    result = convert_directory(src, tmp_path / "dir.erofs", verity=True, blob_digest=True)
    assert (
        result.blob_digest
        == "sha256:"
        + hashlib.sha256((tmp_path / "dir.erofs").read_bytes()[: result.size]).hexdigest()
    )
    with mounted_erofs(tmp_path / "dir.erofs") as mnt:
        assert diff_views(tree_view(mnt), want) == []
        assert hardlink_groups(mnt) == hardlink_groups(src)
    again = convert_directory(src, tmp_path / "again.erofs", verity=True)
    assert again.verity.root_hash == result.verity.root_hash


def test_early_writeback_covers_the_data_and_changes_no_byte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`convert` starts the disk writes of every batch it writes (sync_file_range), all of
    the image after its header; the image is the same as without it."""
    from snapshotter.erofs import writer
    from snapshotter.ingest.convert import convert_layer

    layer = write_tar(tmp_path / "l.tar", awkward_entries())
    ranges: list[tuple[int, int]] = []
    real = writer.start_writeback

    def spy(fd: int, offset: int, length: int) -> None:
        ranges.append((offset, length))
        real(fd, offset, length)

    monkeypatch.setattr(writer, "start_writeback", spy)
    with_writeback = convert_layer(layer, tmp_path / "a.erofs")
    assert writer._SYNC_FILE_RANGE[0] is not None  # Linux: the call is there
    start = writer.header_blocks(4096) * 4096
    assert ranges and ranges[0][0] == start
    for (offset, length), (following, _) in itertools.pairwise(ranges):
        assert offset + length == following  # contiguous, in order
    assert ranges[-1][0] + ranges[-1][1] == with_writeback.size
    monkeypatch.setattr(writer, "_SYNC_FILE_RANGE", [None])
    convert_layer(layer, tmp_path / "b.erofs")
    assert (tmp_path / "a.erofs").read_bytes() == (tmp_path / "b.erofs").read_bytes()
