"""`erofs-passthrough-mount`: mounts a VM-mode snapshot for runc, as mount.fuse's helper.

A VM-mode snapshot's one mount has the type `fuse.erofs-passthrough-mount`. containerd (1.6,
1.7, 2.1: mount/mount_linux.go `mountWithHelper`) runs such a mount as

    mount.fuse SOURCE TARGET -o OPT -o OPT ... -t erofs-passthrough-mount

and mount(8) runs `mount.fuse` for `-t fuse.erofs-passthrough-mount` too; mount.fuse then runs

    erofs-passthrough-mount SOURCE TARGET -o OPT,OPT,...,dev,suid

(the program found on PATH by the name after `fuse.`, the convention nydus-overlayfs uses). We
read the chain's description (fsmeta.json beside the fsmeta, never anything else), mount the
fsmeta with every layer blob as a device through fsconfig (no option string to outgrow), and,
for an active snapshot, the overlay with the snapshot's upper/work on top. The fsmeta mount is
made at a private temporary directory and detached once the overlay holds it, so the one mount
containerd unmounts at TARGET releases everything (file-backed mounts or autoclear loops).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from snapshotter import fsmount
from snapshotter.errors import EpError, InvalidArgument
from snapshotter.fsmeta.devices import MOUNT_PROGRAM, OPTION_PREFIX, read_mounted_description
from snapshotter.service.hostmount import unmount_all

# What mount(8)/mount.fuse add or a user may write that asks for the default: nothing to do.
_DEFAULTS = {"rw", "dev", "suid", "exec", "async", "relatime", "defaults"}


class MountHelperError(InvalidArgument):
    """The arguments are not a VM-mode mount we can make; the message says why."""


def _parse(argv: list[str]) -> tuple[str, str, list[str]]:
    parser = argparse.ArgumentParser(
        prog=MOUNT_PROGRAM,
        description=(
            "Mount a VM-mode snapshot of erofs-passthrough (what mount.fuse runs for the mount "
            "type fuse.erofs-passthrough-mount)."
        ),
    )
    parser.add_argument("source", help="the chain's image.fsmeta")
    parser.add_argument("target", help="where to mount the rootfs")
    parser.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        help="comma-separated mount options (repeatable)",
    )
    parser.add_argument("-t", dest="type", help="ignored (the helper's own name)")
    args = parser.parse_args(argv)
    options = [o for group in args.options for o in group.split(",") if o]
    return args.source, args.target, options


def mount(source: str, target: str, options: list[str]) -> None:
    """Mount the VM-mode snapshot SOURCE/OPTIONS at TARGET (see the module docstring)."""
    chain = read_mounted_description(source, options)
    dirs: dict[str, str] = {}
    attrs = 0
    for option in options:
        key, _, value = option.partition("=")
        if key in ("upperdir", "workdir"):
            dirs[key] = value
        elif key in fsmount.MOUNT_FLAGS:
            attrs |= fsmount.MOUNT_FLAGS[key]
        elif key not in _DEFAULTS and not option.startswith(OPTION_PREFIX):
            raise MountHelperError(f"unknown mount option {option!r}")
    if set(dirs) not in (set(), {"upperdir", "workdir"}):
        raise MountHelperError("upperdir and workdir come together or not at all")
    if not os.path.isdir(target):
        raise MountHelperError(f"mount point {target} is not a directory")
    devices = [d.path for d in chain.devices()]
    if not dirs:  # a view: the image itself, read-only
        fsmount.mount_erofs(devices[0], target, devices[1:], attrs)
        return
    lower = Path(tempfile.mkdtemp(prefix="erofs-passthrough-lower-"))
    try:
        fsmount.mount_erofs(devices[0], str(lower), devices[1:])
        try:
            fsmount.mount_overlay(str(lower), dirs["upperdir"], dirs["workdir"], target, attrs)
        finally:
            # The overlay holds its own private reference to the lower mount: detaching ours
            # leaves the rootfs whole and makes TARGET's unmount release the image.
            unmount_all(lower)
    finally:
        lower.rmdir()


def main(argv: list[str] | None = None) -> int:
    source, target, options = _parse(sys.argv[1:] if argv is None else argv)
    try:
        mount(source, target, options)
    except (EpError, OSError) as exc:
        if isinstance(exc, OSError):
            message = (exc.strerror or str(exc)) + (f": {exc.filename}" if exc.filename else "")
        else:
            message = str(exc)
        print(f"{MOUNT_PROGRAM}: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
