"""Mounting a multi-device EROFS with the new mount API (fsopen/fsconfig/fsmount).

mount(2) takes all options as one string of at most a page, so ~100 `device=/dev/...` options
("mount options too long") is where upstream's merged mounts stop. fsconfig sets each option
with its own call, so a fsmeta with hundreds of blobs mounts with no long string at all.
Standard library only: the guest agent uses this module too.
"""

from __future__ import annotations

import ctypes
import os

# x86_64 syscall numbers and flags (linux/mount.h); the new mount API exists since 5.2.
_SYS_MOVE_MOUNT = 429
_SYS_FSOPEN = 430
_SYS_FSCONFIG = 431
_SYS_FSMOUNT = 432
_FSOPEN_CLOEXEC = 0x1
_FSCONFIG_SET_FLAG = 0
_FSCONFIG_SET_STRING = 1
_FSCONFIG_CMD_CREATE = 6
_FSMOUNT_CLOEXEC = 0x1
_MOUNT_ATTR_RDONLY = 0x1
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_AT_FDCWD = -100

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _syscall(number: int, *args: object) -> int:
    ret = _libc.syscall(number, *args)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def _read_fs_log(fd: int) -> str:
    """The messages the filesystem left in the fs context (why a mount failed)."""
    lines = []
    while True:
        try:
            lines.append(os.read(fd, 4096).decode(errors="replace").strip())
        except OSError:
            return "; ".join(lines)


def mount_erofs(source: str, target: str, devices: list[str] | None = None) -> None:
    """Mount the EROFS on block device `source` read-only at `target`, with one `device`
    option per extra device (in device-table order)."""
    fs_fd = _syscall(_SYS_FSOPEN, b"erofs", _FSOPEN_CLOEXEC)
    try:
        try:
            _syscall(_SYS_FSCONFIG, fs_fd, _FSCONFIG_SET_STRING, b"source",
                     os.fsencode(source), 0)
            for dev in devices or []:
                _syscall(_SYS_FSCONFIG, fs_fd, _FSCONFIG_SET_STRING, b"device",
                         os.fsencode(dev), 0)
            _syscall(_SYS_FSCONFIG, fs_fd, _FSCONFIG_SET_FLAG, b"ro", None, 0)
            _syscall(_SYS_FSCONFIG, fs_fd, _FSCONFIG_CMD_CREATE, None, None, 0)
        except OSError as exc:
            detail = _read_fs_log(fs_fd)
            raise OSError(exc.errno, f"erofs mount of {source}: {exc.strerror}"
                          + (f" ({detail})" if detail else "")) from None
        mnt_fd = _syscall(_SYS_FSMOUNT, fs_fd, _FSMOUNT_CLOEXEC, _MOUNT_ATTR_RDONLY)
        try:
            _syscall(_SYS_MOVE_MOUNT, mnt_fd, b"", _AT_FDCWD, os.fsencode(target),
                     _MOVE_MOUNT_F_EMPTY_PATH)
        finally:
            os.close(mnt_fd)
    finally:
        os.close(fs_fd)
