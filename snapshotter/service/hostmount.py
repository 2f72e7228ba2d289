"""Mounting and unmounting EROFS layer blobs on the host (the new mount API, umount2).

A layer is mounted file-backed on kernels whose EROFS takes a regular file (6.12+, probed once
by snapshotter.fsmount), else over a read-only loop device that detaches with the mount.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path

from snapshotter import fsmount
from snapshotter.errors import EpError
from snapshotter.fsutil import os_error_class

MNT_DETACH = 2
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def is_mountpoint(path: Path) -> bool:
    return os.path.ismount(path)


def mount_erofs(image: Path, target: Path) -> None:
    """Mount IMAGE read-only at TARGET (file-backed, or over a loop device that goes away on
    unmount)."""
    try:
        fsmount.mount_erofs(str(image), str(target))
    except OSError as exc:
        raise os_error_class(exc)(f"mount erofs {image} at {target}: {exc.strerror}") from None


def unmount_all(target: Path) -> None:
    """Detach every mount stacked on TARGET (lazily: users keep what they have open)."""
    while is_mountpoint(target):
        if _libc.umount2(os.fsencode(target), MNT_DETACH) != 0:
            err = ctypes.get_errno()
            raise EpError(f"umount {target}: {os.strerror(err)}")
