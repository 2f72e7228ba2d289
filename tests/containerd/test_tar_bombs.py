"""Resource bombs: tiny layers that declare huge or impossible things.

Each conversion runs in a child process under an address-space limit and a timeout, so a
reader that believes a declared size shows up here as a failure (MemoryError traceback, or a
timeout) instead of taking the machine down. What must come out instead: one clear line on
stderr, a non-zero exit, and no output file; or, for a huge *sparse* file, an image the
kernel mounts, made in seconds.
"""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from shim_integration.testbed.containerd_dist import from_suite
from shim_integration.testbed.containerd_private import Stack
from snapshotter.erofs.limits import Limits
from snapshotter.errors import EpError
from snapshotter.ingest.convert import convert_layer
from snapshotter.service.api.containerd.services.diff.v1 import diff_pb2, diff_pb2_grpc
from snapshotter.service.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter.service.api.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from snapshotter.service.api.containerd.types import descriptor_pb2
from tests.support import tarcraft as t
from tests.support.helpers import mounted_erofs, require_root

CLI = [sys.executable, "-m", "shim_integration.cli"]
MEMORY_LIMIT = 1 << 30  # address space of the converting process
TIMEOUT = 90
NS = [("containerd-namespace", "default")]


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def convert_bounded(layer: Path, out: Path) -> subprocess.CompletedProcess[str]:
    """`convert` in a child with at most MEMORY_LIMIT of address space and TIMEOUT seconds."""
    try:
        return subprocess.run(
            [*CLI, "convert", str(layer), str(out)],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            preexec_fn=_limit_memory,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"convert of {layer.name} ran over {TIMEOUT} s (a declared size believed)")


def assert_refused(proc: subprocess.CompletedProcess[str], out_dir: Path, message: str) -> None:
    assert proc.returncode != 0, "a hostile layer was accepted"
    assert "Traceback" not in proc.stderr and "MemoryError" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert message in lines[0], lines[0]
    assert list(out_dir.iterdir()) == [], "a refused layer left output behind"


def gzip_of_zeros(gib: int) -> bytes:
    """A multi-member gzip of `gib` GiB of zeros, ~1 KB per MiB: a decompression bomb."""
    member = zlib.compressobj(9, zlib.DEFLATED, 31)
    piece = member.compress(bytes(1 << 20)) + member.flush()
    return piece * (gib << 10)


NEGATIVE_SIZES = {
    # size -512: a reader that skips `size + padding` bytes reads the rest of the layer into
    # memory (the gzip bomb appended to these makes that ~2 GiB).
    "negative octal size": (t.header(b"neg", size=b"-1000"), "bad size field"),
    "negative base-256 size": (t.header(b"neg", size=t.base256(-512, 12)), "out of range"),
    "PAX size -512": (t.pax([(b"size", b"-512")]) + t.header(b"neg"), "out of range"),
}


@pytest.mark.parametrize("case", NEGATIVE_SIZES)
def test_negative_sizes_are_one_clear_line(tmp_path: Path, case: str) -> None:
    tar, message = NEGATIVE_SIZES[case]
    layer = tmp_path / "bad.tar.gz"
    layer.write_bytes(zlib.compress(tar + t.end(), 9, 31) + gzip_of_zeros(2))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    assert_refused(convert_bounded(layer, out_dir / "bad.erofs"), out_dir, message)


def test_gzip_of_thousands_of_members_streams_in_bounded_memory(tmp_path: Path) -> None:
    """2 GiB of tar as 2048 gzip members in 2 MB: each read must stay bounded, not inflate
    every member of a 1 MiB input chunk at once (that recursed and took ~1 GiB per read)."""
    piece = 1 << 20
    size = (2 << 30) - 2 * piece
    layer = tmp_path / "members.tar.gz"
    with open(layer, "wb") as f:
        f.write(zlib.compress(t.header(b"zeros", size=size) + bytes(piece - 512), 1, 31))
        member = zlib.compress(bytes(piece), 9, 31)
        for _ in range(size // piece - 1):
            f.write(member)
        f.write(zlib.compress(bytes(512) + t.end(), 1, 31))
    assert layer.stat().st_size < 8 << 20
    out = tmp_path / "members.erofs"
    proc = convert_bounded(layer, out)
    assert proc.returncode == 0, proc.stderr
    with mounted_erofs(out) as mnt:
        assert (mnt / "zeros").stat().st_size == size
        with open(mnt / "zeros", "rb") as f:
            f.seek(size - (1 << 20))
            assert f.read() == bytes(1 << 20)


def _bad_number_layers() -> dict[str, tuple[bytes, str]]:
    """name: (tar bytes, what the one-line error must say)."""
    ok = t.member(b"ok", b"fine")
    xattrs = [(b"SCHILY.xattr.user.k%03d" % i, b"v") for i in range(300)]
    return {
        "PAX size with underscores": (t.pax([(b"size", b"1_0")]) + t.member(b"f"), "bad PAX size"),
        "base-256 mtime 2^80": (t.member(b"f", mtime=t.base256(1 << 80, 12)) + ok, "mtime"),
        "PAX mtime of 31 digits": (
            t.pax([(b"mtime", b"1" + b"0" * 30)]) + t.member(b"f"),
            "bad PAX mtime",
        ),
        "PAX uid over 32 bits": (t.pax([(b"uid", b"99999999999")]) + t.member(b"f"), "99999999999"),
        "device major 4096": (t.member(b"dev", typeflag=b"3", devmajor=4096), "4096:0"),
        "device major 2^40": (
            t.member(b"dev", typeflag=b"4", devmajor=t.base256(1 << 40, 8)),
            "cannot be stored",
        ),
        "300 xattrs on a file": (
            t.pax(xattrs) + t.member(b"a") + t.pax(xattrs) + t.member(b"b"),
            "xattrs",
        ),
        "sparse map beyond the file": (
            t.pax_sparse_1x0(b"s", 1 << 20, [((1 << 20) - 2, b"abcd")]),
            "beyond the file",
        ),
        "old GNU sparse with negative offset": (
            t.header(
                b"s",
                typeflag=b"S",
                size=4,
                gnu=True,
                gnu_sparse=(
                    t.base256(-4096, 12) + t.field(4, 12) + bytes(72) + b"\0" + t.field(1 << 20, 12)
                ),
            )
            + t.padded(b"data"),
            "negative offset",
        ),
    }


BAD_NUMBERS = _bad_number_layers()


@pytest.mark.parametrize("case", BAD_NUMBERS)
def test_out_of_range_numbers_are_one_clear_line(tmp_path: Path, case: str) -> None:
    tar, message = BAD_NUMBERS[case]
    layer = tmp_path / "bad.tar"
    layer.write_bytes(tar + t.end())
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    assert_refused(convert_bounded(layer, out_dir / "bad.erofs"), out_dir, message)


def test_petabyte_sparse_file_converts_in_seconds_and_mounts(tmp_path: Path) -> None:
    """A 4.5 KB tar declaring a 1 PiB sparse file with three data runs: the holes cost no
    reading, the image stays well under a GiB, the kernel reads data and zeros right."""
    size = 1 << 50
    runs = [(0, b"head"), ((1 << 40) + 12345, b"middle"), (size - 4, b"tail")]
    layer = tmp_path / "peta.tar"
    layer.write_bytes(t.pax_sparse_1x0(b"peta", size, runs) + t.member(b"after", b"x") + t.end())
    assert layer.stat().st_size <= 5 * 1024
    out = tmp_path / "peta.erofs"
    proc = convert_bounded(layer, out)
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size < 600 << 20
    with mounted_erofs(out) as mnt:
        path = mnt / "peta"
        assert path.stat().st_size == size
        with open(path, "rb") as f:
            for offset, data in runs:
                f.seek(offset)
                assert f.read(len(data)) == data
            for hole in (4096, 1 << 45, size - (1 << 20)):
                f.seek(hole)
                assert f.read(1 << 16) == bytes(1 << 16)
        assert (mnt / "after").read_bytes() == b"x"


def test_sparse_file_too_costly_for_the_format_is_refused(tmp_path: Path) -> None:
    """2^62 bytes with data at both ends: EROFS needs either ~2^30 chunk indexes or chunks
    of tens of GiB stored whole; refused in one line, nothing written."""
    size = 1 << 62
    layer = tmp_path / "huge.tar"
    layer.write_bytes(t.pax_sparse_1x0(b"huge", size, [(0, b"a"), (size - 1, b"z")]) + t.end())
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    assert_refused(
        convert_bounded(layer, out_dir / "huge.erofs"), out_dir, "max_sparse_overhead_bytes"
    )


def test_file_size_beyond_the_kernel_maximum_is_refused(tmp_path: Path) -> None:
    layer = tmp_path / "big.tar"
    layer.write_bytes(t.pax([(b"size", b"%d" % (1 << 63))]) + t.header(b"big") + t.end())
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    assert_refused(convert_bounded(layer, out_dir / "big.erofs"), out_dir, "out of range")


def test_million_component_pax_path_is_refused(tmp_path: Path) -> None:
    """2 MB of `a/a/a/...` in one PAX path took 1.6 GB of memory to hold as a tree."""
    layer = tmp_path / "deep.tar.gz"
    layer.write_bytes(
        zlib.compress(
            t.pax([(b"path", b"a/" * 1_000_000 + b"f")]) + t.member(b"f", b"x") + t.end(), 9, 31
        )
    )
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    assert_refused(convert_bounded(layer, out_dir / "deep.erofs"), out_dir, "max_header_bytes")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (b"a/" * 1100 + b"f", "max_path_depth"),
        ((b"x" * 200 + b"/") * 21 + b"f", "max_path_bytes"),
    ],
)
def test_path_depth_and_length_are_bounded(tmp_path: Path, name: bytes, message: str) -> None:
    layer = tmp_path / "deep.tar"
    layer.write_bytes(t.pax([(b"path", name)]) + t.member(b"f", b"x") + t.end())
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    assert_refused(convert_bounded(layer, out_dir / "deep.erofs"), out_dir, message)


def test_implicit_directories_count_against_the_metadata_limit(tmp_path: Path) -> None:
    """Entries whose deep paths imply a million directories: the tree's memory is charged as
    it grows, so the default `max_metadata_bytes` stops it before the memory limit does."""
    deep = b"/".join([b"d"] * 1000)
    layer = tmp_path / "implicit.tar.gz"
    body = b"".join(
        t.pax([(b"path", b"top%04d/" % i + deep + b"/f")]) + t.member(b"f") for i in range(1100)
    )
    layer.write_bytes(zlib.compress(body + t.end(), 6, 31))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    assert_refused(
        convert_bounded(layer, out_dir / "implicit.erofs"), out_dir, "max_metadata_bytes"
    )


def _files(n: int, size: int = 1) -> bytes:
    return b"".join(t.member(b"f%06d" % i, b"x" * size) for i in range(n)) + t.end()


@pytest.mark.parametrize(
    ("limits", "layer", "message"),
    [
        (Limits(max_entries=10), _files(11), "max_entries"),
        (Limits(max_tar_bytes=1 << 20), _files(2, 2 << 20), "max_tar_bytes"),
        (Limits(max_image_bytes=4 << 20), _files(3, 3 << 20), "max_image_bytes"),
        (Limits(max_metadata_bytes=64 << 10), _files(100), "max_metadata_bytes"),
        (
            Limits(max_header_bytes=1024),
            t.pax([(b"comment", b"c" * 2000)]) + _files(1),
            "max_header_bytes",
        ),
        (Limits(max_path_depth=3), t.member(b"a/b/c/d") + t.end(), "max_path_depth"),
        (Limits(max_path_bytes=10), t.member(b"abcdefghijk") + t.end(), "max_path_bytes"),
        (
            Limits(max_sparse_overhead_bytes=1 << 20),
            t.pax_sparse_1x0(b"s", 1 << 40, [(0, b"a"), (1 << 39, b"b")]) + t.end(),
            "max_sparse_overhead_bytes",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_configured_limits_are_enforced(
    tmp_path: Path, limits: Limits, layer: bytes, message: str
) -> None:
    src = tmp_path / "layer.tar"
    src.write_bytes(layer)
    out = tmp_path / "out.erofs"
    with pytest.raises(EpError, match=message):
        convert_layer(src, out, limits=limits)
    assert not out.exists() and os.listdir(tmp_path) == ["layer.tar"]
    convert_layer(src, out)  # within the default limits the same layer converts


def test_limits_must_be_positive_integers() -> None:
    assert Limits().max_header_bytes == 1 << 20
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_entries"):
            Limits(max_entries=bad)


# --- The same bombs through the service: containerd's content store, our differ's Apply ----


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    require_root()
    base = Path(tempfile.mkdtemp(prefix="ctd-bombs-"))
    running = Stack(from_suite("trixie"), base, differ=True).start()
    yield running
    running.stop()
    shutil.rmtree(base, ignore_errors=True)


def _peak_rss(pid: int) -> int:
    """The process's peak resident set (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def _apply_layer(
    stack: Stack, blob: Path, key: str, media_type: str
) -> tuple[grpc.StatusCode, str]:
    digest = "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest()
    stack.containerd.ingest(blob, digest)
    with grpc.insecure_channel(f"unix:{stack.service.socket}") as channel:
        mounts = (
            pb_grpc.SnapshotsStub(channel)
            .Prepare(pb.PrepareSnapshotRequest(key=key), metadata=NS)
            .mounts
        )
        request = diff_pb2.ApplyRequest(
            diff=descriptor_pb2.Descriptor(
                media_type=media_type, digest=digest, size=blob.stat().st_size
            ),
            mounts=mounts,
        )
        try:
            diff_pb2_grpc.DiffStub(channel).Apply(request, metadata=NS, timeout=TIMEOUT)
            return grpc.StatusCode.OK, ""
        except grpc.RpcError as exc:
            return exc.code(), exc.details()


def test_apply_refuses_bombs_in_one_line_and_stays_small(stack: Stack, tmp_path: Path) -> None:
    """A 2 MB gzip (negative size, then 2 GiB of zeros) and a 2 MB PAX path through Apply:
    refused with a status containerd shows as one line, quickly, with the service's peak
    memory barely moving; a 1 PiB sparse layer then applies."""
    assert stack.service.proc is not None
    pid = stack.service.proc.pid
    before = _peak_rss(pid)
    bombs = {
        "negative-size": zlib.compress(t.header(b"neg", size=b"-1000") + t.end(), 9, 31)
        + gzip_of_zeros(2),
        "deep-path": zlib.compress(
            t.pax([(b"path", b"a/" * 1_000_000 + b"f")]) + t.member(b"f", b"x") + t.end(), 9, 31
        ),
    }
    for name, data in bombs.items():
        blob = tmp_path / f"{name}.tar.gz"
        blob.write_bytes(data)
        code, details = _apply_layer(
            stack, blob, f"default/bomb/{name}", "application/vnd.oci.image.layer.v1.tar+gzip"
        )
        assert code not in (grpc.StatusCode.OK, grpc.StatusCode.INTERNAL), (name, code)
        assert "\n" not in details and "Traceback" not in details, details
        want = "bad size field" if name == "negative-size" else "max_header_bytes"
        assert want in details, (code, details)
    assert _peak_rss(pid) - before < 200 << 20
    size = 1 << 50
    blob = tmp_path / "peta.tar"
    blob.write_bytes(t.pax_sparse_1x0(b"peta", size, [(0, b"head"), (size - 4, b"tail")]) + t.end())
    code, details = _apply_layer(
        stack, blob, "default/bomb/peta", "application/vnd.oci.image.layer.v1.tar"
    )
    assert code == grpc.StatusCode.OK, details
