"""Mounting and unmounting EROFS layer blobs on the host (util-linux `mount`, umount2)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import subprocess
from pathlib import Path

from snapshotter.errors import EpError

MNT_DETACH = 2
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def is_mountpoint(path: Path) -> bool:
    return os.path.ismount(path)


def mount_erofs(image: Path, target: Path) -> None:
    """Mount IMAGE read-only at TARGET through a loop device that goes away on unmount."""
    proc = subprocess.run(
        ["mount", "-t", "erofs", "-o", "ro,loop", str(image), str(target)],
        capture_output=True, text=True,
    )
    if proc.returncode != 0:
        raise EpError(f"mount -t erofs {image} {target}: {proc.stderr.strip()}")


def unmount_all(target: Path) -> None:
    """Detach every mount stacked on TARGET (lazily: users keep what they have open)."""
    while is_mountpoint(target):
        if _libc.umount2(os.fsencode(target), MNT_DETACH) != 0:
            err = ctypes.get_errno()
            raise EpError(f"umount {target}: {os.strerror(err)}")
