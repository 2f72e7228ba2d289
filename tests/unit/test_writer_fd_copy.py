"""DataWriter.add_file_fd: file data copied in the kernel lands exactly where, and as,
add_file's read path puts it (holes, tails, inline files, padding), feeds `seen` every byte in
order, falls back to pread/pwrite when copy_file_range is refused, and a file shorter than
announced is an EpError."""

from __future__ import annotations

import hashlib
import io
import os
import random
import tempfile
from pathlib import Path

import pytest

from snapshotter.erofs.tree import Chunks, Extent, InlineTail
from snapshotter.erofs.writer import DataWriter
from snapshotter.errors import EpError

CHUNK = 64 << 10


def _files() -> list[bytes]:
    rng = random.Random(11)
    mixed = b"".join(
        bytes(CHUNK)
        if k == 0
        else rng.randbytes(CHUNK)
        if k == 1
        else b"\0" * 9 + b"x" + bytes(CHUNK - 10)
        for k in (rng.randrange(3) for _ in range(40))
    )
    return [
        b"",
        b"tiny",
        rng.randbytes(4000),
        rng.randbytes(CHUNK - 1),
        rng.randbytes(CHUNK),
        rng.randbytes(CHUNK + 1),
        rng.randbytes(CHUNK + 4095),
        bytes(CHUNK) + rng.randbytes(5000),  # a hole, then a tail
        bytes(3 * CHUNK),  # all holes
        bytes(2 * CHUNK) + b"z" * 100,
        mixed + rng.randbytes(1234),
        mixed,
        rng.randbytes((1 << 20) + 3 * CHUNK + 17),  # across read buffers
    ]


def _image(
    files: list[bytes], tmp: Path, *, fd_path: bool, tail_packing: bool, kernel_copy: bool = True
) -> tuple[bytes, list[object], str]:
    digest = hashlib.sha256()
    layouts: list[object] = []
    with tempfile.TemporaryFile(dir=tmp) as out:
        writer = DataWriter(out.fileno(), 4096, 1, tail_packing=tail_packing)
        writer._kernel_copy = kernel_copy
        for i, data in enumerate(files):
            xattrs = {b"user.k": b"v" * (i * 300)}  # some leave no room for a tail
            if fd_path:
                src = tmp / f"f{i}"
                src.write_bytes(data)
                fd = os.open(src, os.O_RDONLY)
                try:
                    layouts.append(writer.add_file_fd(fd, len(data), xattrs, digest.update))
                finally:
                    os.close(fd)
            else:
                stream = io.BytesIO(data)

                def read(n: int, stream: io.BytesIO = stream) -> bytes:
                    chunk = stream.read(n)
                    digest.update(chunk)
                    return chunk

                layouts.append(writer.add_file(read, len(data), xattrs))
        writer.add_blocks(b"end")
        writer.flush()
        return os.pread(out.fileno(), 1 << 26, 0), layouts, digest.hexdigest()


@pytest.mark.parametrize("tail_packing", [False, True])
@pytest.mark.parametrize("kernel_copy", [True, False])
def test_fd_copy_gives_the_read_paths_bytes_layout_and_digest(
    tmp_path: Path, tail_packing: bool, kernel_copy: bool
) -> None:
    files = _files()
    want = _image(files, tmp_path, fd_path=False, tail_packing=tail_packing)
    got = _image(files, tmp_path, fd_path=True, tail_packing=tail_packing, kernel_copy=kernel_copy)
    assert got == want
    kinds = {type(layout) for layout in want[1]}
    assert {Chunks, Extent, InlineTail} <= kinds  # holes, extents and inline data all met
    assert want[2] == hashlib.sha256(b"".join(files)).hexdigest()


def test_fd_copy_of_a_file_shorter_than_announced_is_an_error(tmp_path: Path) -> None:
    src = tmp_path / "short"
    src.write_bytes(random.Random(3).randbytes(3 * CHUNK))
    with tempfile.TemporaryFile(dir=tmp_path) as out:
        writer = DataWriter(out.fileno(), 4096, 1)
        fd = os.open(src, os.O_RDONLY)
        try:
            with pytest.raises(EpError, match="unexpected end of data"):
                writer.add_file_fd(fd, 5 * CHUNK)
        finally:
            os.close(fd)
