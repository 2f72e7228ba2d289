"""mount(2) and umount2(2) for the host's requests and the images the agent opens, and
teardown: undo everything this agent set up, newest first."""

from __future__ import annotations

import errno
import os

from passthrough.guest import dm
from passthrough.guest.state import (
    IMAGE_BASE,
    MOUNT_BASE,
    AgentError,
    AgentState,
    rmdir_quiet,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

MS_RDONLY = 1
MNT_DETACH = 2


def op_mount(state: AgentState, req: dict[str, Any]) -> dict[str, Any]:
    target = req.get("target") or f"{MOUNT_BASE}/{os.path.basename(req['source'])}"
    os.makedirs(target, exist_ok=True)
    options = ",".join(req.get("options", []))
    flags = MS_RDONLY if req.get("read_only", True) else 0
    libc, get_errno = state.libc()
    rc = libc.mount(
        req["source"].encode(),
        target.encode(),
        req.get("fstype", "erofs").encode(),
        flags,
        options.encode() or None,
    )
    if rc != 0:
        err = get_errno()
        rmdir_quiet(target)
        raise AgentError(f"mount {req['source']} on {target}: {os.strerror(err)}", err)
    state.mounts.append(target)
    return {"target": target}


def mount_tmpfs(state: AgentState, target: str, size: str) -> None:
    os.makedirs(target, exist_ok=True)
    libc, get_errno = state.libc()
    if libc.mount(b"tmpfs", target.encode(), b"tmpfs", 0, f"mode=0755,size={size}".encode()) != 0:
        err = get_errno()
        raise AgentError(f"tmpfs on {target}: {os.strerror(err)}", err)
    state.mounts.append(target)


def umount(state: AgentState, target: str, lazy: bool = False) -> None:
    libc, get_errno = state.libc()
    if libc.umount2(target.encode(), MNT_DETACH if lazy else 0) != 0:
        err = get_errno()
        raise AgentError(f"umount {target}: {os.strerror(err)}", err)
    if target in state.mounts:
        state.mounts.remove(target)
    rmdir_quiet(target)


def op_umount(state: AgentState, req: dict[str, Any]) -> dict[str, Any]:
    umount(state, req["target"], bool(req.get("lazy")))
    return {"unmounted": req["target"]}


def op_teardown(state: AgentState, req: dict[str, Any]) -> dict[str, Any]:
    """Unmount everything this agent mounted and remove its dm devices, newest first."""
    done: dict[str, list[str]] = {"unmounted": [], "removed": []}
    errors = []
    for target in reversed(list(state.mounts)):
        try:
            umount(state, target)
            done["unmounted"].append(target)
        except AgentError as exc:
            errors.append(str(exc))
    for name in reversed(list(state.dm)):
        try:
            dm.remove(state, name)
            done["removed"].append(name)
        except AgentError as exc:
            errors.append(str(exc))
    if errors:
        raise AgentError("; ".join(errors), errno.EBUSY)
    for image in state.images():
        rmdir_quiet(f"{IMAGE_BASE}/{image.name}")
        state.forget_image(image.name)
    return done
