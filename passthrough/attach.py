"""Attach files read-only to a running QEMU as hotplugged block devices, and detach them.

Two transports:
- virtio-blk: QEMU opens the file itself (`blockdev-add` raw over file, read-only) and a
  `virtio-blk-pci` device with a serial goes onto a free pcie-root-port.
- vhost-user-blk: the VM's qemu-storage-daemon opens the file and exports it
  (`blockdev-add` + `block-export-add` type vhost-user-blk on a unix socket); QEMU connects a
  socket chardev to it and plugs a `vhost-user-blk-pci` device onto a free root port. Its serial
  is always "vhost_user_blk", so the guest finds it by the root port's PCI address. The daemon
  is the one given, or our launcher's (qsd.sock beside the QMP socket), or else one attach
  starts for the VM (`storage_daemon.VmDaemon`): reused by later attaches, stopped when it
  exports nothing any more (the last detach) or when QEMU exits. QEMU's guest RAM must be
  shared (memory-backend-memfd share=on), or the daemon cannot serve it: checked first.

All state is read back from QEMU (QOM) and the storage daemon, never kept here: every name is
derived from the file's path, so attaching an attached file finds it again (idempotent), and a
CLI process started later can detach what an earlier one attached. Each attach undoes its own
steps if a later one fails (a peer dying, a refused command), newest first, so nothing is left
half-attached; a file lock serialises attachers of one VM.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from passthrough import procs
from passthrough.errors import (
    GuestRamNotShared,
    NotAttached,
    PassthroughError,
    PoolExhausted,
    QmpCommandError,
    QmpGone,
    StorageDaemonFailure,
)
from passthrough.qmp import QmpSession
from passthrough.storage_daemon import VmDaemon, reap_orphans
from passthrough.transports import TRANSPORTS

ROOT_PORT_TYPE = "pcie-root-port"
VHOST_USER_BLK_SERIAL = "vhost_user_blk"
_PREFIX = {"virtio-blk": "ep-b-", "vhost-user-blk": "ep-v-"}
_DRIVER = {"virtio-blk": "virtio-blk-pci", "vhost-user-blk": "vhost-user-blk-pci"}
DETACH_TIMEOUT = 15.0


@dataclass(frozen=True)
class Attachment:
    device_id: str
    transport: str
    file: str | None
    root_port: str
    pci_slot: str | None  # the root port's guest PCI address, e.g. "0000:00:08.3"
    serial: str
    node_name: str
    chardev: str | None = None
    export_id: str | None = None
    socket: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def device_id_for(path: str | os.PathLike[str], transport: str) -> str:
    """The device id (also node-name stem and virtio serial, <= 20 bytes) for PATH."""
    if transport not in TRANSPORTS:
        raise PassthroughError(f"unknown transport {transport!r} (one of {', '.join(TRANSPORTS)})")
    digest = hashlib.sha256(os.path.realpath(path).encode()).hexdigest()[:12]
    return _PREFIX[transport] + digest


def _names(device_id: str) -> dict[str, str]:
    return {"node": f"{device_id}-node", "chardev": f"{device_id}-chr", "export": device_id}


def _transport_of(device_id: str) -> str | None:
    return next((t for t, p in _PREFIX.items() if device_id.startswith(p)), None)


class _Undo:
    """Compensating actions of a multi-step operation, run newest first on failure."""

    def __init__(self) -> None:
        self._steps: list[tuple[str, Callable[[], object]]] = []

    def push(self, what: str, fn: Callable[[], object]) -> None:
        self._steps.append((what, fn))

    def run(self) -> list[str]:
        failed = []
        for what, fn in reversed(self._steps):
            try:
                fn()
            except Exception as exc:  # best effort: report, keep undoing the rest
                failed.append(f"{what}: {exc}")
        self._steps.clear()
        return failed


class Attacher:
    """Attach/detach on one VM: its QEMU QMP session, and the storage daemon's for vhost-user."""

    def __init__(
        self,
        qmp: QmpSession,
        qsd_path: str | Path | None = None,
        runtime_dir: str | Path | None = None,
        before_step: Callable[[str], None] | None = None,
        run_dir: str | Path | None = None,
    ) -> None:
        """QSD_PATH is the storage daemon's QMP socket; without it, qsd.sock beside QEMU's
        QMP socket (our launcher's daemon) if there is one, else the daemon attach runs for
        this VM in its own runtime directory under RUN_DIR (storage_daemon.VmDaemon), where
        its export sockets and the VM's attach lock then live (RUNTIME_DIR, for the first two
        cases only, is where they go instead of beside the QMP socket).
        BEFORE_STEP, if given, is called with each attach step's name ("daemon",
        "blockdev-add", "qsd:blockdev-add", "qsd:block-export-add", "chardev-add",
        "device_add") right before it runs: the fault-injection point the tests use to kill a
        real peer (or the attacher itself) mid-attach."""
        self.qmp = qmp
        self._before_step = before_step or (lambda step: None)
        beside = Path(qmp.path).parent / "qsd.sock"
        self.daemon: VmDaemon | None = None
        if qsd_path is None and not beside.exists():
            self.daemon = VmDaemon(qmp.path, run_dir)
            self.runtime_dir = self.daemon.dir
            self.qsd_path = self.daemon.qmp_path
        else:
            self.runtime_dir = Path(runtime_dir or Path(qmp.path).parent)
            self.qsd_path = Path(qsd_path) if qsd_path else beside
        self._qsd: QmpSession | None = None
        self._qsd_pid: int | None = None  # the daemon self._qsd talks to

    # --- peers and locking ---------------------------------------------------------------------

    @property
    def qsd(self) -> QmpSession:
        if self._qsd is None or not self._qsd.alive:
            if self.daemon is not None and self.daemon.running() is None:
                raise QmpGone(f"no storage daemon runs for {self.daemon.vm_qmp}")
            if not self.qsd_path.exists():
                raise QmpGone(
                    f"no qemu-storage-daemon QMP socket at {self.qsd_path} "
                    "(vhost-user-blk needs the VM's storage daemon)"
                )
            self._qsd = QmpSession(self.qsd_path, name="erofs-passthrough-qsd")
        return self._qsd

    def close(self) -> None:
        if self._qsd is not None:
            self._qsd.close()
            self._qsd = None

    def __enter__(self) -> Attacher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if self.daemon is not None:
            with self.daemon.locked():
                yield
            return
        lock = self.runtime_dir / f".{Path(self.qmp.path).name}.attach-lock"
        with open(lock, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # --- reading QEMU's state ------------------------------------------------------------------

    def _peripherals(self) -> dict[str, str]:
        """{device id: QOM type} of every user-created device."""
        out = {}
        for prop in self.qmp.cmd("qom-list", path="/machine/peripheral"):
            t = prop["type"]
            if t.startswith("child<"):
                out[prop["name"]] = t[len("child<") : -1]
        return out

    def _parent_port(self, device_id: str) -> str:
        bus = self.qmp.cmd(
            "qom-get", path=f"/machine/peripheral/{device_id}", property="parent_bus"
        )
        # "/machine/peripheral/ep-rp3/ep-rp3": the root port's secondary bus
        return str(bus).rstrip("/").split("/")[-2]

    def root_ports(self) -> dict[str, str | None]:
        """{root port id: guest PCI address} in pool order (QEMU's bus 0 is the guest's 00)."""
        slots: dict[str, str] = {}
        for bus in self.qmp.cmd("query-pci"):
            for dev in bus["devices"]:
                if dev.get("qdev_id"):
                    slots[dev["qdev_id"]] = (
                        f"0000:{bus['bus']:02x}:{dev['slot']:02x}.{dev['function']:x}"
                    )
        ports = [d for d, t in self._peripherals().items() if t == ROOT_PORT_TYPE]
        ports.sort(key=lambda p: (slots.get(p) or "", p))
        return {p: slots.get(p) for p in ports}

    def busy_ports(self) -> dict[str, str]:
        """{root port id: id of the device on it}, read from QOM (which, unlike query-pci, also
        knows devices behind ports the guest has not enumerated yet)."""
        periph = self._peripherals()
        ports = {d for d, t in periph.items() if t == ROOT_PORT_TYPE}
        busy = {}
        for dev in periph:
            if dev in ports:
                continue
            with contextlib.suppress(QmpCommandError):
                parent = self._parent_port(dev)
                if parent in ports:
                    busy[parent] = dev
        return busy

    def free_ports(self) -> list[str]:
        busy = self.busy_ports()
        return [p for p in self.root_ports() if p not in busy]

    def _block_nodes(self, session: QmpSession) -> dict[str, str]:
        """{node-name: filename} of the named block nodes of SESSION's peer."""
        return {
            n["node-name"]: n.get("file", "")
            for n in session.cmd("query-named-block-nodes", flat=True)
        }

    def attached(self) -> list[Attachment]:
        """Every device this module attached to the VM (by its naming scheme)."""
        ports = self.root_ports()
        busy = {dev: port for port, dev in self.busy_ports().items()}
        nodes = self._block_nodes(self.qmp)
        qsd_nodes: dict[str, str] | None = None
        out = []
        for dev, port in sorted(busy.items()):
            transport = _transport_of(dev)
            if transport is None:
                continue
            names = _names(dev)
            if transport == "vhost-user-blk":
                if qsd_nodes is None:
                    try:
                        qsd_nodes = self._block_nodes(self.qsd)
                    except QmpGone:
                        qsd_nodes = {}
                out.append(
                    self._describe(
                        dev, transport, qsd_nodes.get(names["node"]), port, ports.get(port)
                    )
                )
            else:
                out.append(
                    self._describe(dev, transport, nodes.get(names["node"]), port, ports.get(port))
                )
        return out

    def _describe(
        self, dev: str, transport: str, file: str | None, port: str, slot: str | None
    ) -> Attachment:
        names = _names(dev)
        if transport == "virtio-blk":
            return Attachment(dev, transport, file, port, slot, dev, names["node"])
        return Attachment(
            dev,
            transport,
            file,
            port,
            slot,
            VHOST_USER_BLK_SERIAL,
            names["node"],
            names["chardev"],
            names["export"],
            str(self._socket_path(dev)),
        )

    def _socket_path(self, device_id: str) -> Path:
        return self.runtime_dir / f"{device_id}.vhost.sock"

    # --- attach --------------------------------------------------------------------------------

    def attach(self, file: str | os.PathLike[str], transport: str) -> Attachment:
        """Attach FILE read-only over TRANSPORT on a free root port (or return the existing
        attachment of FILE over TRANSPORT)."""
        path = os.path.realpath(file)
        dev = device_id_for(path, transport)
        try:
            st = os.stat(path)
        except OSError as exc:
            raise PassthroughError(f"cannot attach {file}: {exc.strerror}") from None
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise PassthroughError(f"cannot attach {file}: not a regular file or block device")
        with self._locked(), self._daemon_tidied():
            if transport == "vhost-user-blk":
                self._require_shared_ram()
            self._sweep_daemon()
            existing = {a.device_id: a for a in self.attached()}
            if dev in existing:
                return existing[dev]
            self._remove_leftovers(dev, transport)
            free = self.free_ports()
            if not free:
                raise PoolExhausted(
                    f"no free pcie-root-port for {file}: all "
                    f"{len(self.root_ports())} are in use (start the VM with more)"
                )
            port = free[0]
            undo = _Undo()
            try:
                if transport == "virtio-blk":
                    self._attach_virtio_blk(path, dev, port, undo)
                else:
                    self._before_step("daemon")
                    self._ensure_daemon()
                    self._attach_vhost_user_blk(path, dev, port, undo)
            except BaseException as exc:
                failed = undo.run()
                if failed and isinstance(exc, PassthroughError):
                    exc.args = (f"{exc} (and undoing: {'; '.join(failed)})",)
                raise
            return self._describe(dev, transport, path, port, self.root_ports().get(port))

    @contextlib.contextmanager
    def _daemon_tidied(self) -> Iterator[None]:
        """After an attach or detach (under the lock): stop the daemon attach runs if it
        exports nothing, so none is left by the last detach, a failed attach or a refusal.
        A failure to tidy up does not hide the operation's own error."""
        try:
            yield
        except BaseException:
            with contextlib.suppress(PassthroughError):
                self._stop_daemon_if_idle()
            raise
        self._stop_daemon_if_idle()

    def _require_shared_ram(self) -> None:
        """vhost-user hands the daemon the guest's RAM as file descriptors: every memory
        backend must be shared (QEMU's own `-m` RAM, memory-backend-ram, is not)."""
        memdevs = self.qmp.cmd("query-memdev")
        unshared = [m["id"] for m in memdevs if not m.get("share")]
        if not memdevs or unshared:
            raise GuestRamNotShared(
                f"vhost-user-blk needs guest RAM the storage daemon can map, and memory "
                f"backend {', '.join(unshared) or '(none)'} of the QEMU at {self.qmp.path} is "
                "not shared (start QEMU with -object memory-backend-memfd,id=mem,size=...,"
                "share=on -machine memory-backend=mem); nothing was attached"
            )

    def _qemu_pid(self) -> int:
        """The pid of the QEMU behind our QMP connection, from its socket's peer
        credentials. qemu.qmp does not expose the socket, hence its private stream writer."""
        writer = getattr(getattr(self.qmp, "_client", None), "_writer", None)
        sock = writer.get_extra_info("socket") if writer is not None else None
        pid = procs.peer_pid(sock) if sock is not None else 0
        if pid <= 0:
            raise StorageDaemonFailure(
                f"cannot tell which process serves {self.qmp.path} (no peer credentials: "
                "another pid namespace?); start a qemu-storage-daemon for the VM and pass "
                "its QMP socket with --storage-daemon"
            )
        return pid

    def _ensure_daemon(self) -> None:
        """Start (or find) the storage daemon attach runs for this VM; caller holds the lock."""
        if self.daemon is None:
            return
        state = self.daemon.ensure(self._qemu_pid())
        if self._qsd is not None and state.qsd_pid != self._qsd_pid:
            self._qsd.close()
            self._qsd = None
        self._qsd_pid = state.qsd_pid

    def _sweep_daemon(self) -> None:
        """For the daemon attach runs: stop daemons of VMs that are gone, and remove what a
        killed attach left in this VM's (exports, nodes and chardevs without a device), so
        the daemon exports exactly the plugged devices. Caller holds the lock."""
        if self.daemon is None:
            return
        reap_orphans(self.daemon.root.parent)
        stems = {c["label"].removesuffix("-chr") for c in self.qmp.cmd("query-chardev")}
        if self.daemon.running() is None:
            self.daemon.stop()  # remains of a daemon that died, or one still starting
        else:
            stems |= {e["id"] for e in self.qsd.cmd("query-block-exports")}
            stems |= {n.removesuffix("-node") for n in self._block_nodes(self.qsd)}
        plugged = set(self._peripherals())
        for dev in sorted(stems - plugged):
            if _transport_of(dev) == "vhost-user-blk":
                self._remove_leftovers(dev, "vhost-user-blk")

    def _stop_daemon_if_idle(self) -> None:
        """Stop the daemon attach runs once it exports nothing, and remove its runtime
        directory when no daemon runs (caller holds the lock)."""
        if self.daemon is None:
            return
        if self.daemon.running() is not None:
            with contextlib.suppress(QmpGone):
                if self.qsd.cmd("query-block-exports") or self._block_nodes(self.qsd):
                    return
        self.close()
        self.daemon.stop()
        self.daemon.remove()

    def _attach_virtio_blk(self, path: str, dev: str, port: str, undo: _Undo) -> None:
        node = _names(dev)["node"]
        self._before_step("blockdev-add")
        self.qmp.cmd(
            "blockdev-add",
            **{
                "driver": "raw",
                "node-name": node,
                "read-only": True,
                "file": {
                    "driver": "file",
                    "node-name": f"{dev}-file",
                    "filename": path,
                    "read-only": True,
                },
            },
        )
        undo.push(
            f"blockdev-del {node}", lambda: self.qmp.cmd("blockdev-del", **{"node-name": node})
        )
        self._before_step("device_add")
        self.qmp.cmd(
            "device_add", driver=_DRIVER["virtio-blk"], id=dev, drive=node, bus=port, serial=dev
        )

    def _attach_vhost_user_blk(self, path: str, dev: str, port: str, undo: _Undo) -> None:
        names = _names(dev)
        sock = self._socket_path(dev)
        qsd = self.qsd
        self._before_step("qsd:blockdev-add")
        qsd.cmd(
            "blockdev-add",
            **{"driver": "file", "node-name": names["node"], "filename": path, "read-only": True},
        )
        undo.push(
            f"qsd blockdev-del {names['node']}",
            lambda: qsd.cmd("blockdev-del", **{"node-name": names["node"]}),
        )
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()
        self._before_step("qsd:block-export-add")
        qsd.cmd(
            "block-export-add",
            **{
                "type": "vhost-user-blk",
                "id": names["export"],
                "node-name": names["node"],
                "writable": False,
                "addr": {"type": "unix", "path": str(sock)},
            },
        )
        undo.push(
            f"qsd block-export-del {names['export']}",
            lambda: self._del_export(qsd, names["export"]),
        )
        self._before_step("chardev-add")
        self.qmp.cmd(
            "chardev-add",
            id=names["chardev"],
            backend={
                "type": "socket",
                "data": {"addr": {"type": "unix", "data": {"path": str(sock)}}, "server": False},
            },
        )
        undo.push(
            f"chardev-remove {names['chardev']}",
            lambda: self.qmp.cmd("chardev-remove", id=names["chardev"]),
        )
        self._before_step("device_add")
        self.qmp.cmd(
            "device_add",
            driver=_DRIVER["vhost-user-blk"],
            id=dev,
            chardev=names["chardev"],
            bus=port,
            **{"num-queues": 1},
        )

    def _del_export(self, qsd: QmpSession, export_id: str) -> None:
        with qsd.listen("BLOCK_EXPORT_DELETED") as events:
            qsd.cmd("block-export-del", id=export_id, mode="hard")
            qsd.wait_event(events, lambda e: e.get("data", {}).get("id") == export_id, 10.0)
        with contextlib.suppress(FileNotFoundError):
            self._socket_path(export_id).unlink()

    def _remove_leftovers(self, dev: str, transport: str) -> list[str]:
        """Backends named for DEV without a device (a killed attacher's): remove them."""
        names = _names(dev)
        removed = []
        if transport == "virtio-blk":
            if names["node"] in self._block_nodes(self.qmp):
                self.qmp.cmd("blockdev-del", **{"node-name": names["node"]})
                removed.append(names["node"])
            return removed
        if any(c["label"] == names["chardev"] for c in self.qmp.cmd("query-chardev")):
            self.qmp.cmd("chardev-remove", id=names["chardev"])
            removed.append(names["chardev"])
        if self.daemon is not None and self.daemon.running() is None:
            return removed  # no daemon attach runs for this VM: nothing of DEV in one
        qsd = self.qsd
        if any(e["id"] == names["export"] for e in qsd.cmd("query-block-exports")):
            self._del_export(qsd, names["export"])
            removed.append(names["export"])
        if names["node"] in self._block_nodes(qsd):
            qsd.cmd("blockdev-del", **{"node-name": names["node"]})
            removed.append(names["node"])
        return removed

    # --- detach --------------------------------------------------------------------------------

    def resolve(self, what: str | os.PathLike[str]) -> list[str]:
        """Device ids meant by WHAT: a device id, or a file attached over any transport."""
        text = os.fspath(what)
        if _transport_of(text) is not None and not os.path.exists(text):
            return [text]
        return [device_id_for(text, t) for t in TRANSPORTS]

    def detach(self, what: str | os.PathLike[str], timeout: float = DETACH_TIMEOUT) -> Attachment:
        """Unplug the device (wait for the guest to let go: DEVICE_DELETED with its id), then
        remove its backends. NotAttached if nothing by that name is attached."""
        with self._locked(), self._daemon_tidied():
            return self._detach(what, timeout)

    def _detach(self, what: str | os.PathLike[str], timeout: float) -> Attachment:
        if self.daemon is not None:
            reap_orphans(self.daemon.root.parent)
        attached = {a.device_id: a for a in self.attached()}
        candidates = self.resolve(what)
        found = [attached[d] for d in candidates if d in attached]
        if not found:
            for dev in candidates:  # nothing plugged, but maybe a killed attacher's remains
                transport = _transport_of(dev)
                if transport and self._remove_leftovers(dev, transport):
                    return self._describe(dev, transport, None, "", None)
            raise NotAttached(f"{os.fspath(what)} is not attached")
        if len(found) > 1:
            raise PassthroughError(
                f"{os.fspath(what)} is attached over several transports; "
                f"detach by device id: {[a.device_id for a in found]}"
            )
        att = found[0]
        with self.qmp.listen("DEVICE_DELETED") as events:
            self.qmp.cmd("device_del", id=att.device_id)
            # The virtio backend's DEVICE_DELETED (no "device") comes first; wait for ours.
            self.qmp.wait_event(
                events, lambda e: e.get("data", {}).get("device") == att.device_id, timeout
            )
        self._remove_leftovers(att.device_id, att.transport)
        return att
