"""Mounting a multi-device EROFS with the new mount API (fsopen/fsconfig/fsmount).

mount(2) takes all options as one string of at most a page, so ~100 `device=/dev/...` options
("mount options too long") is where upstream's merged mounts stop. fsconfig sets each option
with its own call, so a fsmeta with hundreds of blobs mounts with no long string at all.
Standard library only: the guest agent uses this module too.

Files (layer blobs, fsmetas) are mounted file-backed where the kernel can (EROFS's file-backed
mounts, Linux 6.12+ with CONFIG_EROFS_FS_BACKED_BY_FILE): no loop device per layer, nothing to
leak. Elsewhere each file gets a read-only loop device with autoclear, so it goes away with the
mount. Which one is found by probing the kernel once (`file_backed_supported`), not by its
version string: distribution kernels backport, and the option can be compiled out.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import struct
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

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
_MOUNT_ATTR_NOSUID = 0x2
_MOUNT_ATTR_NODEV = 0x4
_MOUNT_ATTR_NOEXEC = 0x8
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


# linux/loop.h
_LOOP_CTL_GET_FREE = 0x4C82
_LOOP_CONFIGURE = 0x4C0A
_LO_FLAGS_READ_ONLY = 1
_LO_FLAGS_AUTOCLEAR = 4
_LOOP_CONFIG_SIZE = 304  # struct loop_config: fd, block_size, loop_info64 (232), 8 x u64
_LO_FLAGS_OFFSET = 8 + 40 + 12  # lo_flags within loop_config (after fd, block_size, ...)

MOUNT_FLAGS = {
    "ro": _MOUNT_ATTR_RDONLY,
    "nosuid": _MOUNT_ATTR_NOSUID,
    "nodev": _MOUNT_ATTR_NODEV,
    "noexec": _MOUNT_ATTR_NOEXEC,
}

_probe_lock = threading.Lock()
_file_backed: bool | None = None


def file_backed_supported() -> bool:
    """Whether this kernel's EROFS mounts a regular file as its source (tried once).

    The probe hands fsconfig a regular file of zeros: a kernel with file-backed mounts reads
    it and refuses the superblock (EINVAL); one without looks for a block device (ENOTBLK).
    Any other answer (no EROFS, no privilege) is taken as "no": the loop path then reports
    the real error on the real image."""
    global _file_backed
    with _probe_lock:
        if _file_backed is None:
            with tempfile.TemporaryFile() as probe:
                probe.write(bytes(4096))
                probe.flush()
                try:
                    _mount_detached(
                        f"/proc/self/fd/{probe.fileno()}",
                        [],
                        _MOUNT_ATTR_RDONLY,
                        fstype=b"erofs",
                        close=True,
                    )
                    _file_backed = True  # (a zero superblock never mounts; be permissive)
                except OSError as exc:
                    _file_backed = exc.errno == errno.EINVAL
        return _file_backed


def set_file_backed(supported: bool | None) -> None:
    """Force the probe's answer (None: probe again). For tests of the loop-device path."""
    global _file_backed
    with _probe_lock:
        _file_backed = supported


@contextmanager
def loop_device(path: str) -> Iterator[str]:
    """A read-only loop device over PATH that detaches itself once the last user closes it:
    held open while this context lasts, so a mount made inside keeps it until unmounted."""
    backing = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with open("/dev/loop-control", "rb", buffering=0) as control:
            for _ in range(64):  # another process may take the free device first
                number = fcntl.ioctl(control, _LOOP_CTL_GET_FREE)
                dev = f"/dev/loop{number}"
                loop_fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
                config = bytearray(_LOOP_CONFIG_SIZE)
                struct.pack_into("=II", config, 0, backing, 0)
                struct.pack_into(
                    "=I", config, _LO_FLAGS_OFFSET, _LO_FLAGS_READ_ONLY | _LO_FLAGS_AUTOCLEAR
                )
                try:
                    fcntl.ioctl(loop_fd, _LOOP_CONFIGURE, bytes(config))
                except OSError as exc:
                    os.close(loop_fd)
                    if exc.errno == errno.EBUSY:
                        continue
                    raise OSError(exc.errno, f"loop device for {path}: {exc.strerror}") from None
                break
            else:
                raise OSError(errno.EBUSY, f"no free loop device for {path}")
    finally:
        os.close(backing)
    try:
        yield dev
    finally:
        os.close(loop_fd)


def _is_regular(path: str) -> bool:
    return stat.S_ISREG(os.stat(path).st_mode)


def _mount_detached(
    source: str,
    devices: Sequence[str],
    attrs: int,
    fstype: bytes,
    close: bool = False,
    strings: Sequence[tuple[str, str]] = (),
) -> int:
    """fsopen + one fsconfig per option + fsmount: a detached mount's fd (closed if CLOSE)."""
    fs_fd = _syscall(_SYS_FSOPEN, fstype, _FSOPEN_CLOEXEC)
    try:
        try:
            if source:
                _syscall(
                    _SYS_FSCONFIG, fs_fd, _FSCONFIG_SET_STRING, b"source", os.fsencode(source), 0
                )
            for dev in devices:
                _syscall(_SYS_FSCONFIG, fs_fd, _FSCONFIG_SET_STRING, b"device", os.fsencode(dev), 0)
            for key, value in strings:
                _syscall(
                    _SYS_FSCONFIG, fs_fd, _FSCONFIG_SET_STRING, key.encode(), os.fsencode(value), 0
                )
            if attrs & _MOUNT_ATTR_RDONLY:
                _syscall(_SYS_FSCONFIG, fs_fd, _FSCONFIG_SET_FLAG, b"ro", None, 0)
            _syscall(_SYS_FSCONFIG, fs_fd, _FSCONFIG_CMD_CREATE, None, None, 0)
        except OSError as exc:
            detail = _read_fs_log(fs_fd)
            raise OSError(
                exc.errno,
                f"{fstype.decode()} mount of {source or 'overlay'}: "
                f"{exc.strerror}" + (f" ({detail})" if detail else ""),
            ) from None
        mnt_fd = _syscall(_SYS_FSMOUNT, fs_fd, _FSMOUNT_CLOEXEC, attrs)
    finally:
        os.close(fs_fd)
    if close:
        os.close(mnt_fd)
    return mnt_fd


def _attach(mnt_fd: int, target: str) -> None:
    try:
        _syscall(
            _SYS_MOVE_MOUNT, mnt_fd, b"", _AT_FDCWD, os.fsencode(target), _MOVE_MOUNT_F_EMPTY_PATH
        )
    finally:
        os.close(mnt_fd)


def mount_erofs(
    source: str, target: str, devices: Sequence[str] | None = None, attrs: int = _MOUNT_ATTR_RDONLY
) -> None:
    """Mount the EROFS at `source` read-only at `target`, with one `device` option per extra
    device (in device-table order). Block devices are used as they are; regular files
    file-backed when the kernel can, else each over its own autoclear loop device."""
    paths = [source, *(devices or [])]
    files = [p for p in paths if _is_regular(p)]
    if not files or (len(files) == len(paths) and file_backed_supported()):
        _attach(_mount_detached(source, paths[1:], attrs | _MOUNT_ATTR_RDONLY, b"erofs"), target)
        return
    with ExitStack() as loops:
        # The erofs superblock holds each loop device open; ours close when this returns,
        # and autoclear detaches them when the mount goes.
        resolved = [loops.enter_context(loop_device(p)) if p in files else p for p in paths]
        _attach(
            _mount_detached(resolved[0], resolved[1:], attrs | _MOUNT_ATTR_RDONLY, b"erofs"), target
        )


def mount_overlay(lower: str, upper: str, work: str, target: str, attrs: int = 0) -> None:
    """An overlay of LOWER with UPPER/WORK at TARGET (through fsconfig: no option string)."""
    _attach(
        _mount_detached(
            "overlay",
            [],
            attrs,
            b"overlay",
            strings=[("lowerdir", lower), ("upperdir", upper), ("workdir", work)],
        ),
        target,
    )
