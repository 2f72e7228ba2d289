"""File access for the host: hash a tree, read a file, measure a sequential read. Paths in an
open image are resolved the way the image sees them and never lead out of it."""

from __future__ import annotations

import errno
import os
import time

from passthrough.guest.state import AgentState, oserror

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

READ_CHUNK = 1 << 20
# openat2(2) (Linux 5.6+): resolve a path as if the image's root were "/", so no symlink or
# ".." - however it changes while we look - leads outside the image.
_SYS_OPENAT2 = 437
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_IN_ROOT = 0x10


def _hash_fd(fd: int) -> dict[str, Any]:
    import hashlib

    h = hashlib.sha256()
    size = 0
    try:
        while chunk := os.read(fd, READ_CHUNK):
            h.update(chunk)
            size += len(chunk)
    except OSError as exc:
        return {"errno": exc.errno, "error": exc.strerror}
    return {"sha256": h.hexdigest(), "size": size}


def hash_tree(root: str) -> dict[str, Any]:
    """Every entry under ROOT: regular files by content hash (or the errno reading gave),
    symlinks by target, directories and devices by mode.

    Walks by directory file descriptors and opens with O_NOFOLLOW | O_NONBLOCK, checking the
    opened file is the regular file it listed: a process in the image that swaps an entry for
    a symlink (out of the image) or a FIFO (to hang us) while we walk gets an error entry,
    never our read of something else."""
    import stat

    entries: dict[str, Any] = {}
    for dirpath, dirnames, filenames, dirfd in os.fwalk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            entry: dict[str, Any] = {"mode": st.st_mode}
            if stat.S_ISREG(st.st_mode):
                entry.update(_hash_regular(name, dirfd))
            elif stat.S_ISLNK(st.st_mode):
                entry["target"] = os.readlink(name, dir_fd=dirfd)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                entry["rdev"] = [os.major(st.st_rdev), os.minor(st.st_rdev)]
            entries[rel] = entry
    return {"entries": entries}


def _hash_regular(name: str, dirfd: int) -> dict[str, Any]:
    import stat

    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dirfd)
    except OSError as exc:
        return {"errno": exc.errno, "error": exc.strerror}
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return {"errno": errno.EINVAL, "error": "changed while walking"}
        return _hash_fd(fd)
    finally:
        os.close(fd)


def _open_in_root(root: str, rel: str, flags: int) -> int:
    import ctypes

    class OpenHow(ctypes.Structure):
        _fields_ = [
            ("flags", ctypes.c_uint64),
            ("mode", ctypes.c_uint64),
            ("resolve", ctypes.c_uint64),
        ]

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    how = OpenHow(flags | os.O_CLOEXEC, 0, _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS)
    rootfd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = libc.syscall(
            _SYS_OPENAT2, rootfd, os.fsencode(rel), ctypes.byref(how), ctypes.sizeof(how)
        )
    finally:
        os.close(rootfd)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), rel)
    return fd


def op_hash_tree(state: AgentState, req: dict[str, Any]) -> dict[str, Any]:
    return hash_tree(req["root"])


def op_read_file(state: AgentState, req: dict[str, Any]) -> dict[str, Any]:
    """A file's bytes. A path in an open image is resolved the way the image sees it (its
    absolute symlinks point into it) and can never lead out of it."""
    path, offset = req["path"], int(req.get("offset", 0))
    length = req.get("length")
    inside = state.image_root_of(path)
    try:
        fd = (
            _open_in_root(inside[0], inside[1], os.O_RDONLY | os.O_NONBLOCK)
            if inside
            else os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        )
        with os.fdopen(fd, "rb", buffering=0) as fh:
            fh.seek(offset)
            data = fh.read(int(length)) if length is not None else fh.read()
    except OSError as exc:
        raise oserror(exc, f"read {path}") from None
    import base64
    import hashlib

    return {
        "data": base64.b64encode(data).decode(),
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
    }


def op_read_speed(state: AgentState, req: dict[str, Any]) -> dict[str, Any]:
    """Read PATH (a file or a block device) sequentially with O_DIRECT-free buffered reads after
    dropping caches; report bytes and seconds."""
    path, limit = req["path"], req.get("limit")
    try:
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
    except OSError:
        pass
    total = 0
    start = time.monotonic()
    try:
        with open(path, "rb", buffering=0) as fh:
            while limit is None or total < limit:
                chunk = fh.read(READ_CHUNK)
                if not chunk:
                    break
                total += len(chunk)
    except OSError as exc:
        raise oserror(exc, f"read {path}") from None
    return {"bytes": total, "seconds": time.monotonic() - start}
