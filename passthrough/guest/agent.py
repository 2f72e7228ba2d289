#!/usr/bin/python3 -S
"""The guest agent: PID 1 of the test guest's root, serving a JSON-lines protocol on a
virtio-serial port.

Runs under the guest's Debian python3 with the standard library, pyudev and (for images)
python3-cryptography; vm-images/build copies it into the guest root image together with the
modules it imports (shim_integration's manifest and guest_verify, snapshotter's fsmount).
One request per line, one response per line:

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
    for image in list(IMAGES.values()):
        _rmdir_quiet(f"{IMAGE_BASE}/{image.name}")
    IMAGES.clear()
    return done


# --- signed images -----------------------------------------------------------------------------

IMAGE_BASE = "/run/ep/images"
REFUSED = errno.EPERM  # the errno of every refusal; the message says why


class Image:
    """An image this agent opened: its dm devices and mounts (newest last)."""

    def __init__(self, name: str, digest: str) -> None:
        self.name = name
        self.digest = digest
        self.dm: list[str] = []
        self.mounts: list[str] = []
        self.result: dict[str, Any] = {}


IMAGES: dict[str, Image] = {}


def _shim_modules() -> Any:
    """shim_integration's guest-side modules (beside this script in the guest root; the
    cryptography they use is Debian's python3-cryptography)."""
    if DIST_PACKAGES not in sys.path:
        sys.path.append(DIST_PACKAGES)
    from passthrough.guest import verify as guest_verify
    from snapshotter import fsmount, manifest

    return manifest, guest_verify, fsmount


def _image_name(req: dict[str, Any]) -> str:
    name = req.get("name") or "image"
    if not (isinstance(name, str) and len(name) <= 32
            and all(c.isalnum() or c in "-_" for c in name)):
        raise AgentError(f"bad image name {name!r} (1-32 of [A-Za-z0-9_-])", errno.EINVAL)
    return name


def _b64(req: dict[str, Any], key: str) -> bytes:
    import base64
    import binascii

    try:
        return base64.b64decode(req[key], validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise AgentError(f"refused: {key} is not base64", REFUSED) from None


def _mount_tmpfs(target: str, size: str) -> None:
    os.makedirs(target, exist_ok=True)
    libc, get_errno = _libc()
    if libc.mount(b"tmpfs", target.encode(), b"tmpfs", 0,
                  f"mode=0755,size={size}".encode()) != 0:
        err = get_errno()
        raise AgentError(f"tmpfs on {target}: {os.strerror(err)}", err)
    STATE.mounts.append(target)


def op_open_image(req: dict[str, Any]) -> dict[str, Any]:
    """Verify a signed manifest against the keys the guest booted with and the root hashes of
    the offered disks; only then open dm-verity per disk, mount the fsmeta with the layer
    devices and a writable overlay (tmpfs upper) over it. Refusals open and mount nothing."""
    started = time.monotonic()
    name = _image_name(req)
    if name in IMAGES:
        raise AgentError(f"image {name} is already open", errno.EEXIST)
    offered = req.get("devices")
    if not isinstance(offered, list) or not offered:
        raise AgentError("devices: a list of {serial} or {pci}, fsmeta first", errno.EINVAL)
    payload, signature = _b64(req, "manifest"), _b64(req, "signature")
    manifest, guest_verify, fsmount = _shim_modules()
    timings: dict[str, float] = {}
    try:
        keys = guest_verify.trusted_keys_from_cmdline(_read_attr("/proc/cmdline") or "")
        if not keys:
            raise manifest.ManifestError(
                f"the guest booted without trusted keys ({guest_verify.CMDLINE_KEYS}=)")
        signed = manifest.verify(payload, signature, keys)
        if "fsmeta" not in signed.manifest:
            raise manifest.ManifestError("the manifest names no fsmeta to mount")
        expected = len(signed.device_verity())
        if len(offered) != expected:
            raise manifest.ManifestError(
                f"{len(offered)} devices offered, the manifest names {expected}")
    except manifest.ManifestError as exc:
        raise AgentError(f"refused: {exc}", REFUSED) from None
    timings["verify_signature"] = time.monotonic() - started

    t = time.monotonic()
    timeout = float(req.get("timeout", 10))
    disks = [wait_block(d.get("serial"), d.get("pci"), timeout) for d in offered]
    timings["wait_devices"] = time.monotonic() - t
    t = time.monotonic()
    labels = [f"{d['name']} " + (f"serial {d['serial']}" if o.get("serial") is not None
                                 else f"pci {o.get('pci')}")
              for d, o in zip(disks, offered, strict=True)]
    try:
        roots = guest_verify.check_offered(signed, [d["path"] for d in disks], labels)
    except manifest.ManifestError as exc:
        raise AgentError(f"refused: {exc}", REFUSED) from None
    timings["check_roots"] = time.monotonic() - t

    image = Image(name, signed.digest())
    base = f"{IMAGE_BASE}/{name}"
    try:
        t = time.monotonic()
        mappers = []
        for i, (disk, verity) in enumerate(zip(disks, signed.device_verity(), strict=True)):
            dm = f"{name}-{i}"
            table = verity_table(guest_verify.verity_params(disk["path"], verity))
            _dmsetup("create", dm, "--readonly", "--table", table)
            STATE.dm.append(dm)
            image.dm.append(dm)
            mappers.append(f"/dev/mapper/{dm}")
        timings["verity_open"] = time.monotonic() - t
        t = time.monotonic()
        lower, rw, rootfs = f"{base}/lower", f"{base}/rw", f"{base}/rootfs"
        os.makedirs(lower, exist_ok=True)
        try:
            fsmount.mount_erofs(mappers[0], lower, mappers[1:])
        except OSError as exc:
            raise _oserror(exc, f"mount the fsmeta of {name}") from None
        STATE.mounts.append(lower)
        image.mounts.append(lower)
        _mount_tmpfs(rw, str(req.get("upper_size", "64m")))
        image.mounts.append(rw)
        os.makedirs(f"{rw}/upper", mode=0o755)
        os.makedirs(f"{rw}/work", mode=0o700)
        op_mount({"source": "overlay", "target": rootfs, "fstype": "overlay",
                  "read_only": False,
                  "options": [f"lowerdir={lower}", f"upperdir={rw}/upper", f"workdir={rw}/work"]})
        image.mounts.append(rootfs)
        timings["mount"] = time.monotonic() - t
    except BaseException:
        try:  # noqa: SIM105 (contextlib would be one more module to import)
            _close(image)
        except AgentError:
            pass  # the first error is the one to report; teardown retries the rest
        raise
    image.result = {
        "name": name, "manifest_digest": image.digest, "key_id": signed.signature["key_id"],
        "image": signed.manifest.get("image"), "rootfs": rootfs, "lower": lower,
        "upper": f"{rw}/upper",
        "devices": [
            {"position": i, "role": "fsmeta" if i == 0 else "layer", "disk": d["path"],
             "serial": d["serial"], "pci_path": d["pci_path"], "dm": m, "root_hash": r}
            for i, (d, m, r) in enumerate(zip(disks, mappers, roots, strict=True))],
        "timings": {k: round(v, 4) for k, v in timings.items()},
    }
    IMAGES[name] = image
    return image.result


def _close(image: Image) -> dict[str, list[str]]:
    """Unmount IMAGE's mounts and remove its dm devices, newest first."""
    done: dict[str, list[str]] = {"unmounted": [], "removed": []}
    for target in reversed(image.mounts):
        if target in STATE.mounts:
            _umount(target)
        done["unmounted"].append(target)
    image.mounts.clear()
    for dm in reversed(image.dm):
        if dm in STATE.dm:
            op_verity_close({"name": dm})
        done["removed"].append(dm)
    image.dm.clear()
    _rmdir_quiet(f"{IMAGE_BASE}/{image.name}")
    IMAGES.pop(image.name, None)
    return done


def op_close_image(req: dict[str, Any]) -> dict[str, Any]:
    name = _image_name(req)
    image = IMAGES.get(name)
    if image is None:
        raise AgentError(f"image {name} is not open", errno.ENOENT)
    return _close(image)


# --- files -------------------------------------------------------------------------------------


def _hash_fd(fd: int) -> dict[str, Any]:
    import hashlib

    h = hashlib.sha256()
    size = 0
    try:
        while chunk := os.read(fd, READ_CHUNK):
            h.update(chunk)
            size += len(chunk)
    except OSError as exc:
        return {"errno": exc.errno, "error": exc.strerror}
    return {"sha256": h.hexdigest(), "size": size}


def hash_tree(root: str) -> dict[str, Any]:
    """Every entry under ROOT: regular files by content hash (or the errno reading gave),
    symlinks by target, directories and devices by mode.

    Walks by directory file descriptors and opens with O_NOFOLLOW | O_NONBLOCK, checking the
    opened file is the regular file it listed: a process in the image that swaps an entry for
    a symlink (out of the image) or a FIFO (to hang us) while we walk gets an error entry,
    never our read of something else."""
    import stat

    entries: dict[str, Any] = {}
    for dirpath, dirnames, filenames, dirfd in os.fwalk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            entry: dict[str, Any] = {"mode": st.st_mode}
            if stat.S_ISREG(st.st_mode):
                entry.update(_hash_regular(name, dirfd))
            elif stat.S_ISLNK(st.st_mode):
                entry["target"] = os.readlink(name, dir_fd=dirfd)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                entry["rdev"] = [os.major(st.st_rdev), os.minor(st.st_rdev)]
            entries[rel] = entry
    return {"entries": entries}


def _hash_regular(name: str, dirfd: int) -> dict[str, Any]:
    import stat

    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=dirfd)
    except OSError as exc:
        return {"errno": exc.errno, "error": exc.strerror}
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return {"errno": errno.EINVAL, "error": "changed while walking"}
        return _hash_fd(fd)
    finally:
        os.close(fd)


# openat2(2) (Linux 5.6+): resolve a path as if the image's root were "/", so no symlink or
# ".." - however it changes while we look - leads outside the image.
_SYS_OPENAT2 = 437
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_IN_ROOT = 0x10


def _open_in_root(root: str, rel: str, flags: int) -> int:
    import ctypes

    class OpenHow(ctypes.Structure):
        _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                    ("resolve", ctypes.c_uint64)]

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    how = OpenHow(flags | os.O_CLOEXEC, 0, _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS)
    rootfd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = libc.syscall(_SYS_OPENAT2, rootfd, os.fsencode(rel), ctypes.byref(how),
                          ctypes.sizeof(how))
    finally:
        os.close(rootfd)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), rel)
    return fd


def _image_root_of(path: str) -> tuple[str, str] | None:
    """(image root, path relative to it) when PATH names something in an open image."""
    norm = os.path.normpath(path)
    for image in IMAGES.values():
        root = (image.result or {}).get("rootfs")
        if root and (norm == root or norm.startswith(root + "/")):
            return root, os.path.relpath(norm, root)
    return None


def op_read_file(req: dict[str, Any]) -> dict[str, Any]:
    """A file's bytes. A path in an open image is resolved the way the image sees it (its
    absolute symlinks point into it) and can never lead out of it."""
    path, offset = req["path"], int(req.get("offset", 0))
    length = req.get("length")
    inside = _image_root_of(path)
    try:
        fd = (_open_in_root(inside[0], inside[1], os.O_RDONLY | os.O_NONBLOCK) if inside
              else os.open(path, os.O_RDONLY | os.O_CLOEXEC))
        with os.fdopen(fd, "rb", buffering=0) as fh:
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
    """Run ARGV; with `image`, chrooted into that open image's root (what a container is)."""
    import subprocess

    chroot = None
    if req.get("image") is not None:
        image = IMAGES.get(req["image"])
        if image is None:
            raise AgentError(f"image {req['image']} is not open", errno.ENOENT)
        root = image.result["rootfs"]

        def chroot() -> None:
            os.chroot(root)
            os.chdir("/")

    try:
        proc = subprocess.run(req["argv"], input=req.get("input"), capture_output=True,
                              text=True, timeout=float(req.get("timeout", 30)), check=False,
                              preexec_fn=chroot)
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
    "open_image": op_open_image,
    "close_image": op_close_image,
    "images": lambda req: {"images": {n: i.result for n, i in IMAGES.items()}},
}


# --- lockdown ----------------------------------------------------------------------------------

# With ep.lockdown=1 on the kernel command line the host gets only what a runtime needs: signed
# images, and commands and reads confined to an open image's root. Without it the raw ops
# (verity_open, mount, run anywhere, ...) are a test and debugging surface that would let the
# host mount anything.
LOCKDOWN_ARG = "ep.lockdown=1"
LOCKDOWN_OPS = frozenset({
    "ping", "block_devices", "wait_block", "wait_block_gone", "open_image", "close_image",
    "images", "teardown", "mounts", "verity_status", "run", "hash_tree", "read_file"})
_LOCKED: list[bool] = []


def locked() -> bool:
    if not _LOCKED:
        _LOCKED.append(LOCKDOWN_ARG in (_read_attr("/proc/cmdline") or "").split())
    return _LOCKED[0]


def _inside_an_image(path: str) -> bool:
    """Lexically inside an open image's root: what the path then resolves to is confined to
    that root when it is opened (hash_tree's fd walk, read_file's openat2)."""
    return _image_root_of(path) is not None


def check_lockdown(op: str, req: dict[str, Any]) -> None:
    """Refuse (EPERM) what a locked-down agent does not serve."""
    if not locked():
        return
    why = None
    if op not in LOCKDOWN_OPS:
        why = f"{op} is not served in lockdown"
    elif op == "run" and req.get("image") is None:
        why = "run needs image=NAME (an open image's root) in lockdown"
    elif op in ("hash_tree", "read_file") and not _inside_an_image(
            str(req.get("root") or req.get("path") or "")):
        why = f"{op} outside an open image's root in lockdown"
    if why:
        raise AgentError(f"refused: {why} ({LOCKDOWN_ARG})", REFUSED)


def handle(line: bytes) -> dict[str, Any]:
    """One request line in, one response object out; never raises."""
    req_id = None
    try:
        req = json.loads(line)
        req_id = req.get("id")
        op = OPS.get(req.get("op"))
        if op is None:
            raise AgentError(f"unknown op {req.get('op')!r}", errno.EINVAL)
        check_lockdown(req["op"], req)
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
    main()
