"""The tar reader against archives GNU tar writes: sparse files (old GNU and PAX 1.0),
base-256 numbers, long names, global PAX headers; converted and mounted by the kernel."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from snapshotter.erofs.reader import ErofsImage
from snapshotter.ingest.tarstream import TarReader
from tests.support.cli import convert
from tests.support.helpers import mounted_erofs, require_root, require_tool


def _sparse_file(path: Path) -> bytes:
    with open(path, "wb") as f:
        f.write(b"head")
        f.seek(3 << 20)
        f.write(b"middle" * 1000)
        f.truncate(8 << 20)
    return path.read_bytes()


@pytest.mark.parametrize("fmt", [["--format=gnu"], ["--format=pax", "--sparse-version=1.0"]])
def test_gnu_tar_sparse_files(tmp_path: Path, fmt: list[str]) -> None:
    tar = require_tool("tar")
    src = tmp_path / "src"
    src.mkdir()
    want = _sparse_file(src / "sparse")
    layer = tmp_path / "sparse.tar"
    subprocess.run([tar, "--sparse", *fmt, "-cf", str(layer), "-C", str(src), "sparse"], check=True)
    assert layer.stat().st_size < 1 << 20, "GNU tar did not write a sparse member"
    out = tmp_path / "sparse.erofs"
    convert(layer, out)
    with ErofsImage(out) as img:
        assert img.read(img.lookup("sparse")) == want
    if os.geteuid() == 0:
        with mounted_erofs(out) as mnt:
            assert (mnt / "sparse").read_bytes() == want


def test_base256_ids_and_global_pax_headers(tmp_path: Path) -> None:
    require_root()
    tar = require_tool("tar")
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"big ids")
    layer = tmp_path / "ids.tar"
    subprocess.run(
        [
            tar,
            "--format=gnu",
            "--owner=:3000000",
            "--group=:4000000",
            "-cf",
            str(layer),
            "-C",
            str(src),
            "f",
        ],
        check=True,
    )
    with open(layer, "rb") as f:
        (member,) = list(TarReader(f))
    assert (member.uid, member.gid) == (3_000_000, 4_000_000)
    out = tmp_path / "ids.erofs"
    convert(layer, out)
    with mounted_erofs(out) as mnt:
        st = os.stat(mnt / "f")
        assert (st.st_uid, st.st_gid) == (3_000_000, 4_000_000)

    layer = tmp_path / "global.tar"
    subprocess.run(
        [
            tar,
            "--format=pax",
            "--pax-option=globexthdr.name=g,mtime:=1234567890",
            "-cf",
            str(layer),
            "-C",
            str(src),
            "f",
        ],
        check=True,
    )
    with open(layer, "rb") as f:
        (member,) = list(TarReader(f))
    assert member.name == b"f" and member.mtime == 1234567890


def test_corrupt_header_checksum_is_refused(tmp_path: Path) -> None:
    tar = require_tool("tar")
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    layer = tmp_path / "l.tar"
    subprocess.run([tar, "-cf", str(layer), "-C", str(src), "f"], check=True)
    data = bytearray(layer.read_bytes())
    data[10] ^= 0x01  # inside the name field
    layer.write_bytes(bytes(data))
    from tests.support.cli import run_cli

    proc = run_cli("convert", layer, tmp_path / "out.erofs", check=False)
    assert proc.returncode != 0 and "checksum" in proc.stderr
