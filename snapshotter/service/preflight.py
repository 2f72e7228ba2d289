"""What `serve` needs from the host, checked before the service is built, one line per problem.

Fatal (the service cannot do its job, so it does not start):
- root: it mounts layers (mount(8), umount2) and owns a root-only socket and state directory;
- the kernel's erofs filesystem (/proc/filesystems; `modprobe erofs` is tried first): every
  committed layer is mounted as erofs;
- paths: the state directory and the socket's directory must be directories (or creatable);
  the socket path fits a unix socket address (107 bytes); a configured signing key must be a
  readable file.

Warnings (the service starts; only some paths need them):
- loop devices (/dev/loop-control): host mounts of committed layers (`mount -o loop`, by us for
  overlay lower directories and by containerd) fail without them; VM-mode devices do not use
  them;
- device-mapper (/dev/mapper/control): the service itself never opens dm devices (the guest
  activates dm-verity), but a runtime that opens dm-verity on the host needs it.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from snapshotter.service.serve_config import ServeConfig

PROC_FILESYSTEMS = Path("/proc/filesystems")
LOOP_CONTROL = Path("/dev/loop-control")
DM_CONTROL = Path("/dev/mapper/control")
UNIX_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes with the terminating NUL


@dataclass(frozen=True)
class Finding:
    fatal: bool
    message: str


def kernel_filesystems(table: Path = PROC_FILESYSTEMS) -> set[str]:
    """Filesystem types the running kernel knows (the last column of /proc/filesystems)."""
    try:
        text = table.read_text()
    except OSError:
        return set()
    return {line.split()[-1] for line in text.splitlines() if line.split()}


def check_erofs(table: Path = PROC_FILESYSTEMS, try_modprobe: bool = True) -> Finding | None:
    if "erofs" in kernel_filesystems(table):
        return None
    tried = ""
    modprobe = shutil.which("modprobe") if try_modprobe else None
    if modprobe is not None:
        try:
            proc = subprocess.run([modprobe, "erofs"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            tried = f"; modprobe erofs: {exc}"
        else:
            if proc.returncode == 0 and "erofs" in kernel_filesystems(table):
                return None
            reason = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
            tried = f"; modprobe erofs: {reason}"
    return Finding(
        True,
        f"the kernel has no erofs filesystem (not in {table}{tried}); "
        "enable CONFIG_EROFS_FS or install the module",
    )


def check_root(euid: int | None = None) -> Finding | None:
    euid = os.geteuid() if euid is None else euid
    if euid == 0:
        return None
    return Finding(
        True,
        f"must run as root (running as uid {euid}): the service mounts layers "
        "and serves containerd",
    )


def check_directory(what: str, path: Path) -> Finding | None:
    """PATH is a directory, or its nearest existing ancestor is one (it will be created)."""
    probe = path
    while True:
        try:
            st = os.stat(probe)
            break
        except FileNotFoundError:
            if probe == probe.parent:
                return Finding(True, f"{what} {path}: no existing ancestor")
            probe = probe.parent
        except OSError as exc:
            at = "" if probe == path else f" {probe}"
            return Finding(True, f"{what} {path}:{at} {exc.strerror}")
    if not stat.S_ISDIR(st.st_mode):
        where = "is" if probe == path else f"cannot be created: {probe} is"
        return Finding(True, f"{what} {path} {where} not a directory")
    return None


def check_socket_path(path: Path) -> Finding | None:
    size = len(os.fsencode(path))
    if size <= UNIX_PATH_MAX:
        return None
    return Finding(
        True, f"socket path {path} is {size} bytes; a unix socket path has at most {UNIX_PATH_MAX}"
    )


def check_readable_file(what: str, path: Path) -> Finding | None:
    if not path.is_file():  # checked first: opening a FIFO would block
        return Finding(True, f"{what} {path} is not a regular file (or does not exist)")
    if not os.access(path, os.R_OK):
        return Finding(True, f"{what} {path} is not readable")
    return None


def check_device(path: Path, missing_means: str) -> Finding | None:
    return None if path.exists() else Finding(False, f"{path} is missing: {missing_means}")


def preflight(config: ServeConfig, euid: int | None = None) -> list[Finding]:
    """Every problem found, fatal ones first."""
    found = [
        check_root(euid),
        check_erofs(),
        check_directory("state directory", config.root),
        check_directory("socket directory", config.address.parent),
        check_socket_path(config.address),
        check_device(
            LOOP_CONTROL,
            "no loop devices; host mounts of committed layers will fail (modprobe loop)",
        ),
        check_device(
            DM_CONTROL,
            "no device-mapper; not used by the service itself, only by "
            "runtimes that open dm-verity on the host (modprobe dm_mod)",
        ),
    ]
    if config.signing_key:
        found.append(check_readable_file("signing key", Path(config.signing_key)))
    return sorted((f for f in found if f is not None), key=lambda f: not f.fatal)
