"""The directory import's guards: the depth bound, and a large file written to between the
read that hashes it and the kernel copy that stores it (the image would not be the content
its UUID names) is refused as a changed tree."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from snapshotter.erofs.tree import FileData
from snapshotter.erofs.writer import DataWriter
from snapshotter.errors import InvalidInput
from snapshotter.ingest import dir_import
from snapshotter.ingest.dir_import import TreeChanged, import_directory


def test_directories_nested_deeper_than_the_bound_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dir_import, "MAX_DEPTH", 4)
    top = tmp_path / "top"
    (top / "a" / "b" / "c").mkdir(parents=True)
    with tempfile.TemporaryFile(dir=tmp_path) as out:
        import_directory(top, DataWriter(out.fileno(), 4096, 1))  # 4 levels: fine
    (top / "a" / "b" / "c" / "d").mkdir()
    with (
        tempfile.TemporaryFile(dir=tmp_path) as out,
        pytest.raises(InvalidInput, match="nested deeper than 4"),
    ):
        import_directory(top, DataWriter(out.fileno(), 4096, 1))


class _WritesDuringCopy(DataWriter):
    """Appends to the source file (by name, as another process would) while it is copied."""

    victim: Path

    def add_file_fd(
        self,
        fd: int,
        size: int,
        xattrs: dict[bytes, bytes] | None = None,
        seen: Callable[[bytes | memoryview], None] | None = None,
    ) -> FileData:
        result = super().add_file_fd(fd, size, xattrs, seen)
        if os.fstat(fd).st_ino == self.victim.stat().st_ino:
            with open(self.victim, "r+b") as f:
                f.write(b"changed")
        return result


@pytest.mark.parametrize("size", [64 << 10, 300_000])
def test_a_large_file_written_during_the_copy_is_a_changed_tree(tmp_path: Path, size: int) -> None:
    top = tmp_path / "top"
    top.mkdir()
    victim = top / "big"
    victim.write_bytes(os.urandom(size))
    (top / "small").write_bytes(b"x" * 100)
    with tempfile.TemporaryFile(dir=tmp_path) as out:
        writer = _WritesDuringCopy(out.fileno(), 4096, 1)
        writer.victim = victim
        with pytest.raises(TreeChanged, match="big: changed while being read"):
            import_directory(top, writer)
