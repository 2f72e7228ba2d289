"""Durable file operations: fsync'd writes, renames and removals the snapshot layout relies on."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(path: Path, mode: int = 0o644) -> Iterator[BinaryIO]:
    """A w+b file that appears at PATH (with MODE) only if the block finishes without an
    exception: temp name in the same directory, fsync, rename, fsync of the directory.
    PATH is then old or new, never partial; on error the temp file is gone."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w+b") as f:
            yield f
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    with atomic_output(path, mode) as f:
        f.write(data)


def rename_durable(src: Path, dst: Path) -> None:
    os.rename(src, dst)
    fsync_dir(dst.parent)


def unlink_durable(path: Path) -> None:
    """Remove PATH if present and make the removal durable before returning."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    fsync_dir(path.parent)


def remove_tree(path: Path) -> None:
    """Remove a directory tree that may be partly written (or already gone)."""
    shutil.rmtree(path, ignore_errors=False, onerror=_ignore_missing)


def _ignore_missing(func: object, path: str, exc_info: tuple) -> None:
    if not isinstance(exc_info[1], FileNotFoundError):
        raise exc_info[1]


def disk_usage(path: Path) -> tuple[int, int]:
    """(bytes allocated, inodes) under PATH, hard links counted once (containerd's DiskUsage)."""
    seen: set[tuple[int, int]] = set()
    size = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in [*dirnames, *filenames, ""]:
            st = os.lstat(os.path.join(dirpath, name)) if name else os.lstat(dirpath)
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                size += st.st_blocks * 512
    return size, len(seen)
