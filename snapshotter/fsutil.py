"""Durable file operations: fsync'd writes, renames and removals the snapshot layout relies on."""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import shutil
import signal
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from snapshotter.errors import (
    EpError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)

# An OSError a user can act on, as the error tree's class for its errno.
_ERRNO_CLASSES: dict[int, type[EpError]] = {
    errno.ENOENT: NotFound,
    errno.ENOTDIR: NotFound,
    errno.EACCES: PermissionDenied,
    errno.EPERM: PermissionDenied,
    errno.EROFS: PermissionDenied,
    errno.ENOSPC: ResourceExhausted,
    errno.EDQUOT: ResourceExhausted,
    errno.EMFILE: ResourceExhausted,
    errno.ENFILE: ResourceExhausted,
    errno.ENOMEM: ResourceExhausted,
}


def os_error_class(exc: OSError) -> type[EpError]:
    """The error-tree class for a failed system call: by errno, else the plain base."""
    return _ERRNO_CLASSES.get(exc.errno or 0, EpError)


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


# Signals whose Python handlers may raise: SIGINT (KeyboardInterrupt) and the CLI's SIGTERM.
_RAISING_SIGNALS = {signal.SIGINT, signal.SIGTERM}


@contextlib.contextmanager
def atomic_output(path: Path, mode: int = 0o644) -> Iterator[BinaryIO]:
    """A w+b file that appears at PATH (with MODE) only if the block finishes without an
    exception: temp name in the same directory, fsync, rename, fsync of the directory.
    PATH is then old or new, never partial; on error the temp file is gone.

    That includes an exception a signal handler raises (Ctrl-C, the CLI's SIGTERM): those
    signals are held back while the temp file is created, and arrive only once its removal
    is armed. Otherwise a signal landing right after the file appeared left it behind.
    """
    held = signal.pthread_sigmask(signal.SIG_BLOCK, _RAISING_SIGNALS)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
        raise
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)  # a held-back signal raises here
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


def file_kind(mode: int) -> str:
    """What a stat mode is, in the words an error message uses."""
    for test, name in (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISLNK, "a symbolic link"),
    ):
        if test(mode):
            return name
    return "an unknown kind of file"


def open_input(path: str | os.PathLike[str]) -> BinaryIO:
    """Open PATH for reading if it is a regular file; anything else (a directory, a FIFO,
    a socket, a device) is an EpError naming what it is.

    Opened with O_NONBLOCK and checked on the descriptor, so a FIFO without a writer cannot
    make the open (and the caller) wait forever, and what is checked is what is read. The
    returned file blocks normally again.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise os_error_class(exc)(f"{path}: {_os_reason(exc)}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise InvalidArgument(f"{path}: is {file_kind(mode)}, not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def check_input(path: str | os.PathLike[str]) -> None:
    """`open_input`'s checks for a caller that opens PATH by name itself."""
    open_input(path).close()


def check_output(
    path: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str]] = ()
) -> None:
    """Refuse an output path `atomic_output` would fail on only after all the work (a
    directory, a missing parent), or would wrongly replace (a device, a FIFO, a socket, or
    one of the command's `inputs`, which the rename would destroy)."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        parent = path.parent
        if not parent.is_dir():
            what = "no such directory" if not parent.exists() else "not a directory"
            raise InvalidArgument(f"{path}: {parent}: {what}") from None
        return
    except OSError as exc:
        raise os_error_class(exc)(f"{path}: {_os_reason(exc)}") from None
    if not stat.S_ISREG(st.st_mode):
        raise InvalidArgument(f"{path}: is {file_kind(st.st_mode)}; the output must be a file name")
    for source in inputs:
        with contextlib.suppress(OSError):  # a missing input is reported as such elsewhere
            if os.path.samefile(source, path):
                raise InvalidArgument(
                    f"{path}: is also an input ({source}); writing it would destroy that input"
                )


CommandFunc = Callable[[Any], int]


def os_errors_as_ep(output: Callable[[Any], str]) -> Callable[[CommandFunc], CommandFunc]:
    """A CLI command's decorator: an OSError that escapes it (disk full, an I/O error, a file
    that changed under us) becomes one EpError line naming the file, never a traceback. A
    temp file's name is replaced by the output it stands for, `output(args)`."""

    def decorate(command: CommandFunc) -> CommandFunc:
        @functools.wraps(command)
        def wrapper(args: Any) -> int:
            try:
                return command(args)
            except OSError as exc:
                name = os.fspath(exc.filename) if exc.filename is not None else ""
                base = os.path.basename(name)
                if not name or (base.startswith(".") and base.endswith(".tmp")):
                    name = output(args)
                raise os_error_class(exc)(f"{name}: {_os_reason(exc)}") from None

        return wrapper

    return decorate


def _os_reason(exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    return exc.strerror.lower() if exc.strerror else str(exc)


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
