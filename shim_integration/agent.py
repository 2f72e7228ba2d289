#!/usr/bin/python3 -S
"""The guest agent: PID 1 of the test guest's root, serving a JSON-lines protocol on a
virtio-serial port.

Runs under the guest's Debian python3 with the standard library and pyudev only (it is copied
into the guest root image by vm-images/build). One request per line, one response per line:

    -> {"id": 7, "op": "mount", "source": "/dev/mapper/l1", "target": "/run/ep/mnt/l1"}
    <- {"id": 7, "ok": true, "result": {...}}
    <- {"id": 7, "ok": false, "error": "mount: ...", "errno": 5}

The host side is `passthrough.agent_client.AgentClient`; docs/passthrough.md lists the ops.
The port reads EOF while no host is connected, so the agent reopens it in a loop, forever: as
PID 1 it must never exit (that would panic the guest).
"""

from __future__ import annotations

# Only what the first request needs is imported up front: under TCG every module costs
# milliseconds of boot-to-ready (subprocess, ctypes, hashlib... come with the ops that use them).
# Started with -S (no site): pyudev's directory is added when it is first needed.
import errno
import json
import os
import select
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

PORT_NAME = "org.erofs-passthrough.agent"
DIST_PACKAGES = "/usr/lib/python3/dist-packages"
MOUNT_BASE = "/run/ep/mnt"
MS_RDONLY = 1
MNT_DETACH = 2
READ_CHUNK = 1 << 20


class AgentError(Exception):
    """A request failed; errno (if any) goes back to the host."""

    def __init__(self, message: str, err: int | None = None) -> None:
        super().__init__(message)
        self.errno = err


def _oserror(exc: OSError, what: str) -> AgentError:
    return AgentError(f"{what}: {exc.strerror or exc}", exc.errno)


# --- block devices -----------------------------------------------------------------------------


def _read_attr(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return None


def _is_pci_addr(part: str) -> bool:
    # 0000:00:02.3
    return len(part) == 12 and part[4] == ":" and part[7] == ":" and part[10] == "."


def _pyudev() -> Any:
    if DIST_PACKAGES not in sys.path:
        sys.path.append(DIST_PACKAGES)
    import pyudev  # the guest's python3-pyudev; imported late so the agent starts fast

    return pyudev


def _udev_context() -> Any:
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = _pyudev().Context()
    return _CONTEXT


_CONTEXT: Any = None


def block_info(device: Any) -> dict[str, Any]:
    """A pyudev block Device as the protocol reports it. No udevd runs in the guest, so
    everything comes from sysfs attributes (udev's ID_SERIAL etc. would be empty)."""
    attrs = device.attributes

    def attr(name: str) -> str | None:
        try:
            return attrs.asstring(name).strip()
        except (KeyError, UnicodeDecodeError):
            return None

    size = attr("size")
    return {
        "name": device.sys_name,
        "path": device.device_node or f"/dev/{device.sys_name}",
        "serial": attr("serial"),
        "pci_path": [p for p in device.sys_path.split("/") if _is_pci_addr(p)],
        "dev": f"{os.major(device.device_number)}:{os.minor(device.device_number)}",
        "size": int(size) * 512 if size else None,
        "read_only": attr("ro") == "1",
    }


def list_disks() -> list[dict[str, Any]]:
    """The guest's virtio disks (pyudev enumeration of block devices of type disk)."""
    disks = _udev_context().list_devices(subsystem="block", DEVTYPE="disk")
    return sorted((block_info(d) for d in disks if d.sys_name.startswith("vd")),
                  key=lambda d: d["name"])


def _matches(info: dict[str, Any], serial: str | None, pci: str | None) -> bool:
    if serial is not None and info["serial"] != serial:
        return False
    return not (pci is not None and pci not in info["pci_path"])


def _udev_monitor() -> Any:
    monitor = _pyudev().Monitor.from_netlink(_udev_context(), source="kernel")
    monitor.filter_by("block")
    monitor.start()
    return monitor


def wait_block(serial: str | None, pci: str | None, timeout: float) -> dict[str, Any]:
    """Wait for a disk with SERIAL (virtio-blk) and/or behind PCI address PCI (vhost-user-blk,
    whose serial is fixed). Listens to kernel uevents (pyudev) so a hotplug is seen at once."""
    if serial is None and pci is None:
        raise AgentError("wait_block needs serial or pci", errno.EINVAL)
    monitor = _udev_monitor()  # listen first, then look: no event falls between the two
    deadline = time.monotonic() + timeout
    while True:
        for info in list_disks():
            if _matches(info, serial, pci) and info["size"]:
                return info
        left = deadline - time.monotonic()
        if left <= 0:
            raise AgentError(f"no disk with serial={serial} pci={pci} after {timeout}s",
                             errno.ENODEV)
        monitor.poll(timeout=min(left, 0.5))


def wait_block_gone(name: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/sys/block/{name}"):
        if time.monotonic() > deadline:
            raise AgentError(f"{name} still present after {timeout}s", errno.EBUSY)
        time.sleep(0.01)
    return {"gone": name}


# --- dm-verity and mounts ----------------------------------------------------------------------

_LIBC: Any = None


def _libc() -> Any:
    """libc's mount(2)/umount2(2) through ctypes (no mount binary to spawn per request)."""
    global _LIBC
    if _LIBC is None:
        import ctypes

        lib = ctypes.CDLL(None, use_errno=True)
        lib.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                              ctypes.c_ulong, ctypes.c_char_p]
        lib.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        _LIBC = (lib, ctypes.get_errno)
    return _LIBC


def verity_table(p: dict[str, Any]) -> str:
    """The dm-verity table line (sizes in 512-byte sectors)."""
    dbs = int(p.get("data_block_size", 4096))
    hbs = int(p.get("hash_block_size", 4096))
    blocks = int(p["data_blocks"])
    salt = p.get("salt") or "-"
    return (f"0 {blocks * dbs // 512} verity {int(p.get('hash_type', 1))} {p['data_device']} "
            f"{p.get('hash_device') or p['data_device']} {dbs} {hbs} {blocks} "
            f"{int(p['hash_start_block'])} {p.get('algorithm', 'sha256')} {p['root_hash']} {salt}")


def _dmsetup(*args: str) -> str:
    import subprocess

    env = dict(os.environ, DM_DISABLE_UDEV="1")  # no udev here: dmsetup makes the nodes itself
    proc = subprocess.run(["dmsetup", *args], capture_output=True, text=True, env=env,
                          check=False)
    if proc.returncode != 0:
        raise AgentError(f"dmsetup {args[0]} failed: {proc.stderr.strip()}", errno.EIO)
    return proc.stdout


class State:
    """What this agent set up, so teardown can undo exactly that, newest first."""

    def __init__(self) -> None:
        self.mounts: list[str] = []
        self.dm: list[str] = []


STATE = State()


def op_verity_open(req: dict[str, Any]) -> dict[str, Any]:
    name = req["name"]
    table = req.get("table") or verity_table(req)
    _dmsetup("create", name, "--readonly", "--table", table)
    STATE.dm.append(name)
    return {"device": f"/dev/mapper/{name}", "table": table}


def op_verity_status(req: dict[str, Any]) -> dict[str, Any]:
    out = _dmsetup("status", req["name"]).split()
    # "0 N verity V|C": C once a corrupted block has been read
    return {"status": out, "corrupted": out[-1] == "C" if out else None}


def op_verity_close(req: dict[str, Any]) -> dict[str, Any]:
    name = req["name"]
    _dmsetup("remove", name)
    if name in STATE.dm:
        STATE.dm.remove(name)
    return {"removed": name}


def op_mount(req: dict[str, Any]) -> dict[str, Any]:
    target = req.get("target") or f"{MOUNT_BASE}/{os.path.basename(req['source'])}"
    os.makedirs(target, exist_ok=True)
    options = ",".join(req.get("options", []))
    flags = MS_RDONLY if req.get("read_only", True) else 0
    libc, get_errno = _libc()
    rc = libc.mount(req["source"].encode(), target.encode(),
                    req.get("fstype", "erofs").encode(), flags, options.encode() or None)
    if rc != 0:
        err = get_errno()
        _rmdir_quiet(target)
        raise AgentError(f"mount {req['source']} on {target}: {os.strerror(err)}", err)
    STATE.mounts.append(target)
    return {"target": target}


def _rmdir_quiet(path: str) -> None:
    try:  # noqa: SIM105 (contextlib would be one more module to import at boot)
        os.rmdir(path)
    except OSError:
        pass


def _umount(target: str, lazy: bool = False) -> None:
    libc, get_errno = _libc()
    if libc.umount2(target.encode(), MNT_DETACH if lazy else 0) != 0:
        err = get_errno()
        raise AgentError(f"umount {target}: {os.strerror(err)}", err)
    if target in STATE.mounts:
        STATE.mounts.remove(target)
    _rmdir_quiet(target)


def op_umount(req: dict[str, Any]) -> dict[str, Any]:
    _umount(req["target"], bool(req.get("lazy")))
    return {"unmounted": req["target"]}


def op_teardown(req: dict[str, Any]) -> dict[str, Any]:
    """Unmount everything this agent mounted and remove its dm devices, newest first."""
    done: dict[str, list[str]] = {"unmounted": [], "removed": []}
    errors = []
    for target in reversed(list(STATE.mounts)):
        try:
            _umount(target)
            done["unmounted"].append(target)
        except AgentError as exc:
            errors.append(str(exc))
    for name in reversed(list(STATE.dm)):
        try:
            op_verity_close({"name": name})
            done["removed"].append(name)
        except AgentError as exc:
            errors.append(str(exc))
    if errors:
        raise AgentError("; ".join(errors), errno.EBUSY)
    return done


# --- files -------------------------------------------------------------------------------------


def _hash_file(path: str) -> dict[str, Any]:
    import hashlib

    h = hashlib.sha256()
    size = 0
    try:
        with open(path, "rb", buffering=0) as fh:
            while chunk := fh.read(READ_CHUNK):
                h.update(chunk)
                size += len(chunk)
    except OSError as exc:
        return {"errno": exc.errno, "error": exc.strerror}
    return {"sha256": h.hexdigest(), "size": size}


def hash_tree(root: str) -> dict[str, Any]:
    """Every entry under ROOT: regular files by content hash (or the errno reading gave),
    symlinks by target, directories and devices by mode."""
    import stat

    entries: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            entry: dict[str, Any] = {"mode": st.st_mode}
            if stat.S_ISREG(st.st_mode):
                entry.update(_hash_file(path))
            elif stat.S_ISLNK(st.st_mode):
                entry["target"] = os.readlink(path)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                entry["rdev"] = [os.major(st.st_rdev), os.minor(st.st_rdev)]
            entries[rel] = entry
    return {"entries": entries}


def op_read_file(req: dict[str, Any]) -> dict[str, Any]:
    path, offset = req["path"], int(req.get("offset", 0))
    length = req.get("length")
    try:
        with open(path, "rb", buffering=0) as fh:
            fh.seek(offset)
            data = fh.read(int(length)) if length is not None else fh.read()
    except OSError as exc:
        raise _oserror(exc, f"read {path}") from None
    import base64
    import hashlib

    return {"data": base64.b64encode(data).decode(), "sha256": hashlib.sha256(data).hexdigest(),
            "size": len(data)}


def op_read_speed(req: dict[str, Any]) -> dict[str, Any]:
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
        raise _oserror(exc, f"read {path}") from None
    return {"bytes": total, "seconds": time.monotonic() - start}


# --- dispatch ----------------------------------------------------------------------------------


def op_ping(req: dict[str, Any]) -> dict[str, Any]:
    return {"pong": True, "pid": os.getpid(), "kernel": os.uname().release,
            "uptime": float(_read_attr("/proc/uptime").split()[0])}  # type: ignore[union-attr]


def op_run(req: dict[str, Any]) -> dict[str, Any]:
    import subprocess

    try:
        proc = subprocess.run(req["argv"], input=req.get("input"), capture_output=True,
                              text=True, timeout=float(req.get("timeout", 30)), check=False)
    except FileNotFoundError as exc:
        raise _oserror(exc, req["argv"][0]) from None
    except subprocess.TimeoutExpired as exc:
        raise AgentError(f"{req['argv'][0]} timed out", errno.ETIMEDOUT) from exc
    return {"rc": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}


OPS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "ping": op_ping,
    "run": op_run,
    "block_devices": lambda req: {"devices": list_disks()},
    "wait_block": lambda req: wait_block(req.get("serial"), req.get("pci"),
                                         float(req.get("timeout", 10))),
    "wait_block_gone": lambda req: wait_block_gone(req["name"], float(req.get("timeout", 10))),
    "verity_open": op_verity_open,
    "verity_status": op_verity_status,
    "verity_close": op_verity_close,
    "mount": op_mount,
    "umount": op_umount,
    "teardown": op_teardown,
    "hash_tree": lambda req: hash_tree(req["root"]),
    "read_file": op_read_file,
    "read_speed": op_read_speed,
    "mounts": lambda req: {"mounts": list(STATE.mounts), "dm": list(STATE.dm)},
}


def handle(line: bytes) -> dict[str, Any]:
    """One request line in, one response object out; never raises."""
    req_id = None
    try:
        req = json.loads(line)
        req_id = req.get("id")
        op = OPS.get(req.get("op"))
        if op is None:
            raise AgentError(f"unknown op {req.get('op')!r}", errno.EINVAL)
        return {"id": req_id, "ok": True, "result": op(req)}
    except AgentError as exc:
        return {"id": req_id, "ok": False, "error": str(exc), "errno": exc.errno}
    except OSError as exc:
        return {"id": req_id, "ok": False, "error": str(exc), "errno": exc.errno}
    except (KeyError, ValueError, TypeError) as exc:
        return {"id": req_id, "ok": False, "error": f"bad request: {exc!r}",
                "errno": errno.EINVAL}
    except Exception as exc:  # an agent bug must not kill PID 1
        import traceback

        traceback.print_exc()
        return {"id": req_id, "ok": False, "error": f"agent error: {exc!r}", "errno": None}


# --- the port ----------------------------------------------------------------------------------


def find_port(name: str = PORT_NAME) -> str | None:
    base = "/sys/class/virtio-ports"
    try:
        ports = sorted(os.listdir(base))
    except OSError:
        return None
    for port in ports:
        if _read_attr(f"{base}/{port}/name") == name:
            return f"/dev/{port}"
    return None


def serve_fd(fd: int) -> None:
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
                reply = (json.dumps(handle(line)) + "\n").encode()
                view = memoryview(reply)
                while view:
                    view = view[os.write(fd, view):]


def main() -> None:
    os.environ.setdefault("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    print(f"ep-agent: serving at {_read_attr('/proc/uptime')} (uptime, idle)", flush=True)
    while True:
        try:
            port = find_port()
            if port is None:
                time.sleep(0.05)
                continue
            fd = os.open(port, os.O_RDWR | os.O_CLOEXEC)
            try:
                serve_fd(fd)
            finally:
                os.close(fd)
            time.sleep(0.02)  # EOF: no host connected; look again shortly
        except Exception:  # PID 1 must not die
            import traceback

            traceback.print_exc()
            time.sleep(0.5)


if __name__ == "__main__":
    sys.exit(main())
