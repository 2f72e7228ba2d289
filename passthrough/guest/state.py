"""What the agent has set up, in one object: its mounts, dm devices and open images (so
teardown undoes exactly that, newest first), whether it is locked down, and the handles it
opens once (pyudev's context, libc). Also the error every op raises."""

from __future__ import annotations

import os

from passthrough.agent_protocol import LOCKDOWN_ON, REFUSED_ERRNO

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

MOUNT_BASE = "/run/ep/mnt"
IMAGE_BASE = "/run/ep/images"


class AgentError(Exception):
    """A request failed; errno (if any) goes back to the host. REFUSED: the guest declines
    on policy (signature, root hashes, lockdown) rather than failing."""

    def __init__(self, message: str, err: int | None = None, refused: bool = False) -> None:
        super().__init__(message)
        self.errno = err
        self.refused = refused


def refusal(message: str) -> AgentError:
    return AgentError(message, REFUSED_ERRNO, refused=True)


def oserror(exc: OSError, what: str) -> AgentError:
    return AgentError(f"{what}: {exc.strerror or exc}", exc.errno)


def read_attr(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return None


def rmdir_quiet(path: str) -> None:
    try:  # noqa: SIM105 (contextlib would be one more module to import at boot)
        os.rmdir(path)
    except OSError:
        pass


class Image:
    """An image this agent opened: its dm devices and mounts (newest last)."""

    def __init__(self, name: str, digest: str, rootfs: str | None = None) -> None:
        self.name = name
        self.digest = digest
        self.dm: list[str] = []
        self.mounts: list[str] = []
        self.result: dict[str, Any] = {"rootfs": rootfs} if rootfs else {}

    @property
    def rootfs(self) -> str | None:
        return self.result.get("rootfs")


class AgentState:
    """The agent's state. LOCKED: None reads `ep.lockdown=1` from /proc/cmdline on first use
    (a test passes True or False)."""

    def __init__(self, locked: bool | None = None, cmdline_path: str = "/proc/cmdline") -> None:
        self.mounts: list[str] = []
        self.dm: list[str] = []
        self._images: dict[str, Image] = {}
        self._locked = locked
        self._cmdline_path = cmdline_path
        self._udev: Any = None
        self._libc: Any = None

    def cmdline(self) -> str:
        return read_attr(self._cmdline_path) or ""

    @property
    def locked(self) -> bool:
        if self._locked is None:
            self._locked = LOCKDOWN_ON in self.cmdline().split()
        return self._locked

    # -- open images --

    def image(self, name: str) -> Image | None:
        return self._images.get(name)

    def images(self) -> list[Image]:
        return list(self._images.values())

    def add_image(self, image: Image) -> None:
        self._images[image.name] = image

    def forget_image(self, name: str) -> None:
        self._images.pop(name, None)

    def image_root_of(self, path: str) -> tuple[str, str] | None:
        """(image root, path relative to it) when PATH lexically names something in an open
        image."""
        norm = os.path.normpath(path)
        for image in self._images.values():
            root = image.rootfs
            if root and (norm == root or norm.startswith(root + "/")):
                return root, os.path.relpath(norm, root)
        return None

    # -- handles opened once --

    def udev(self) -> Any:
        """pyudev's Context: the guest's python3-pyudev, on PYTHONPATH (Debian's
        dist-packages), imported late so the agent starts fast."""
        if self._udev is None:
            import pyudev

            self._udev = pyudev.Context()
        return self._udev

    def libc(self) -> Any:
        """libc's mount(2)/umount2(2) through ctypes (no mount binary to spawn per request),
        with ctypes' get_errno."""
        if self._libc is None:
            import ctypes

            lib = ctypes.CDLL(None, use_errno=True)
            lib.mount.argtypes = [
                ctypes.c_char_p,
                ctypes.c_char_p,
                ctypes.c_char_p,
                ctypes.c_ulong,
                ctypes.c_char_p,
            ]
            lib.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
            self._libc = (lib, ctypes.get_errno)
        return self._libc
