"""The agent's port loop and dispatch: one request line in, one reply line out, on the
virtio-serial port `agent_protocol.AGENT_PORT`.

The port reads EOF while no host is connected, so the agent reopens it in a loop, forever: as
PID 1 it must never exit (that would panic the guest).
"""

from __future__ import annotations

# Only what the first request needs is imported up front: under TCG every module costs
# milliseconds of boot-to-ready (subprocess, ctypes, hashlib... come with the ops that use them).
import errno
import json
import os
import select
import time

from passthrough.agent_protocol import AGENT_PORT, REQUESTS, error_reply, ok_reply
from passthrough.guest.lockdown import check_lockdown
from passthrough.guest.state import AgentError, AgentState, read_attr

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    Op = Callable[[AgentState, dict[str, Any]], dict[str, Any]]


def op_ping(state: AgentState, req: dict[str, Any]) -> dict[str, Any]:
    uptime = read_attr("/proc/uptime") or "0"
    return {
        "pong": True,
        "pid": os.getpid(),
        "kernel": os.uname().release,
        "uptime": float(uptime.split()[0]),
    }


def op_run(state: AgentState, req: dict[str, Any]) -> dict[str, Any]:
    """Run ARGV; with `image`, chrooted into that open image's root (what a container is)."""
    import subprocess

    chroot = None
    if req.get("image") is not None:
        image = state.image(req["image"])
        if image is None or image.rootfs is None:
            raise AgentError(f"image {req['image']} is not open", errno.ENOENT)
        root = image.rootfs

        def chroot() -> None:
            os.chroot(root)
            os.chdir("/")

    try:
        proc = subprocess.run(
            req["argv"],
            input=req.get("input"),
            capture_output=True,
            text=True,
            timeout=float(req.get("timeout", 30)),
            check=False,
            preexec_fn=chroot,
        )
    except FileNotFoundError as exc:
        raise AgentError(f"{req['argv'][0]}: {exc.strerror}", exc.errno) from None
    except subprocess.TimeoutExpired as exc:
        raise AgentError(f"{req['argv'][0]} timed out", errno.ETIMEDOUT) from exc
    return {"rc": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}


def _block_devices(state: AgentState, req: dict[str, Any]) -> dict[str, Any]:
    from passthrough.guest.disks import list_disks

    return {"devices": list_disks(state)}


def _wait_block(state: AgentState, req: dict[str, Any]) -> dict[str, Any]:
    from passthrough.guest.disks import wait_block

    return wait_block(state, req.get("serial"), req.get("pci"), float(req.get("timeout", 10)))


def _wait_block_gone(state: AgentState, req: dict[str, Any]) -> dict[str, Any]:
    from passthrough.guest.disks import wait_block_gone

    return wait_block_gone(req["name"], float(req.get("timeout", 10)))


def _mounts(state: AgentState, req: dict[str, Any]) -> dict[str, Any]:
    return {"mounts": list(state.mounts), "dm": list(state.dm)}


#: Each request's handler: a function here, or "module:function" of passthrough.guest,
#: imported on first use (under TCG every module imported at start-up delays the first ping).
OPS: dict[str, Op | str] = {
    "ping": op_ping,
    "run": op_run,
    "block_devices": _block_devices,
    "wait_block": _wait_block,
    "wait_block_gone": _wait_block_gone,
    "verity_open": "dm:op_verity_open",
    "verity_status": "dm:op_verity_status",
    "verity_close": "dm:op_verity_close",
    "mount": "mounts:op_mount",
    "umount": "mounts:op_umount",
    "teardown": "mounts:op_teardown",
    "hash_tree": "files:op_hash_tree",
    "read_file": "files:op_read_file",
    "read_speed": "files:op_read_speed",
    "mounts": _mounts,
    "open_image": "images:op_open_image",
    "close_image": "images:op_close_image",
    "images": "images:op_images",
}
assert OPS.keys() == REQUESTS.keys(), "the agent serves exactly the protocol's requests"


def handler(name: str) -> Op | None:
    """The handler of request NAME (None if there is no such request)."""
    op = OPS.get(name)
    if isinstance(op, str):
        import importlib

        module, function = op.split(":")
        op = OPS[name] = getattr(importlib.import_module(f"passthrough.guest.{module}"), function)
    return op


class Agent:
    """Request handling over one AgentState."""

    def __init__(self, state: AgentState | None = None) -> None:
        self.state = state or AgentState()

    def handle(self, line: bytes) -> dict[str, Any]:
        """One request line in, one reply object out; never raises."""
        req_id = None
        try:
            req = json.loads(line)
            req_id = req.get("id")
            op = handler(req.get("op")) if isinstance(req.get("op"), str) else None
            if op is None:
                raise AgentError(f"unknown op {req.get('op')!r}", errno.EINVAL)
            check_lockdown(self.state, req["op"], req)
            return ok_reply(req_id, op(self.state, req))
        except AgentError as exc:
            return error_reply(req_id, str(exc), exc.errno, exc.refused)
        except OSError as exc:
            return error_reply(req_id, str(exc), exc.errno)
        except (KeyError, ValueError, TypeError) as exc:
            return error_reply(req_id, f"bad request: {exc!r}", errno.EINVAL)
        except Exception as exc:  # an agent bug must not kill PID 1
            import traceback

            traceback.print_exc()
            return error_reply(req_id, f"agent error: {exc!r}", None)

    def serve_fd(self, fd: int) -> None:
        """Serve requests until the host disconnects (read returns EOF)."""
        buf = b""
        while True:
            select.select([fd], [], [])
            chunk = os.read(fd, 65536)
            if not chunk:
                return
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line.strip():
                    reply = (json.dumps(self.handle(line)) + "\n").encode()
                    view = memoryview(reply)
                    while view:
                        view = view[os.write(fd, view) :]


def find_port(name: str = AGENT_PORT) -> str | None:
    base = "/sys/class/virtio-ports"
    try:
        ports = sorted(os.listdir(base))
    except OSError:
        return None
    for port in ports:
        if read_attr(f"{base}/{port}/name") == name:
            return f"/dev/{port}"
    return None


def main() -> None:
    os.environ.setdefault("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    print(f"ep-agent: serving at {read_attr('/proc/uptime')} (uptime, idle)", flush=True)
    agent = Agent()
    while True:
        try:
            port = find_port()
            if port is None:
                time.sleep(0.05)
                continue
            fd = os.open(port, os.O_RDWR | os.O_CLOEXEC)
            try:
                agent.serve_fd(fd)
            finally:
                os.close(fd)
            time.sleep(0.02)  # EOF: no host connected; look again shortly
        except Exception:  # PID 1 must not die
            import traceback

            traceback.print_exc()
            time.sleep(0.5)
