"""vhost-user-blk attach/detach on a QEMU that nothing of ours started: the test runs
`qemu-system-x86_64` itself with plain arguments (as Kata or a user would) and attach has to
bring, reuse and stop the qemu-storage-daemon for it.

No guest OS is needed: the vhost-user handshake with the daemon happens when QEMU realizes the
device (device_add), not when a guest driver starts (measured: against a socket that accepts
but does not speak vhost-user, device_add does not return, QEMU waits in realize for the
backend's answer; with the daemon it returns at once on a VM that only runs its firmware).
Unplug without a guest needs native PCIe hotplug: with q35's default
ACPI hotplug, device_del waits for the guest's _EJ0 forever; with
`-global ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off`, QEMU removes a device from a slot
the guest never powered at once (DEVICE_DELETED follows; measured on QEMU 7.2).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from passthrough.attach import Attacher, device_id_for
from passthrough.errors import GuestRamNotShared
from passthrough.qmp import QmpSession
from passthrough.storage_daemon import RUN_DIR_ENV, VmDaemon, reap_orphans
from tests.support.helpers import require_tool

pytestmark = pytest.mark.qemu

ROOT_PORTS = 4
CLI = [sys.executable, "-m", "shim_integration.cli"]


@dataclass
class PlainQemu:
    proc: subprocess.Popen[bytes]
    qmp: Path  # for attach/detach
    inspect: Path  # a second monitor for the test's own looks (one client per monitor)
    workdir: Path

    @property
    def daemon(self) -> VmDaemon:
        return VmDaemon(self.qmp)

    def session(self) -> QmpSession:
        return QmpSession(self.inspect)


def _start_qemu(workdir: Path, shared_ram: bool = True) -> PlainQemu:
    if shared_ram:
        memory = [
            "-machine",
            "q35,accel=tcg,memory-backend=mem",
            "-object",
            "memory-backend-memfd,id=mem,size=256M,share=on",
            "-m",
            "256M",
        ]
    else:
        memory = ["-machine", "q35,accel=tcg", "-m", "256M"]
    qmp, inspect = workdir / "qmp.sock", workdir / "inspect.sock"
    argv = [
        "qemu-system-x86_64",
        *memory,
        "-nodefaults",
        "-nographic",
        "-qmp",
        f"unix:{qmp},server,nowait",
        "-qmp",
        f"unix:{inspect},server,nowait",
        "-global",
        "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off",
    ]
    for i in range(ROOT_PORTS):
        argv += ["-device", f"pcie-root-port,id=rp{i},bus=pcie.0,chassis={i + 1},slot={i + 1}"]
    log = open(workdir / "qemu.log", "wb")  # noqa: SIM115 (closed when QEMU is stopped)
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    log.close()
    deadline = time.monotonic() + 20
    while not (qmp.exists() and inspect.exists()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"QEMU did not start: {(workdir / 'qemu.log').read_text()}")
        time.sleep(0.01)
    return PlainQemu(proc, qmp, inspect, workdir)


def _stop(vm: PlainQemu) -> None:
    """Kill QEMU and make sure nothing of the daemon is left, whatever the test did."""
    vm.proc.kill()
    vm.proc.wait()
    daemon = vm.daemon
    deadline = time.monotonic() + 10
    while daemon.dir.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    if daemon.dir.exists():
        with daemon.locked():
            daemon.stop()
            daemon.remove()


@pytest.fixture
def workdir() -> Iterator[Path]:
    # short: unix socket paths hold 107 bytes, pytest's tmp_path can be longer
    path = Path(tempfile.mkdtemp(prefix="ep-anyq-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def vm(workdir: Path) -> Iterator[PlainQemu]:
    require_tool("qemu-system-x86_64")
    require_tool("qemu-storage-daemon")
    machine = _start_qemu(workdir)
    try:
        yield machine
    finally:
        _stop(machine)


@pytest.fixture
def files(workdir: Path) -> list[Path]:
    out = []
    for i in range(3):
        p = workdir / f"layer{i}.img"
        p.write_bytes(bytes([i + 1]) * (64 * 1024))
        out.append(p)
    return out


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60, check=False)


def _attach(vm: PlainQemu, *files: Path) -> list[dict]:
    proc = _cli(
        "attach", "--qmp", str(vm.qmp), "--transport", "vhost-user-blk", "--json", *map(str, files)
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["attached"]


def _detach(vm: PlainQemu, *files: Path) -> list[dict]:
    proc = _cli("detach", "--qmp", str(vm.qmp), "--json", *map(str, files))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["detached"]


def _gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                if fh.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.02)
    return False


def _holders(path: Path) -> list[int]:
    """Pids of every process with PATH open (a scan of /proc/*/fd, as fuser does)."""
    target = os.path.realpath(path)
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) == target:
                        pids.append(int(proc.name))
                        break
    return pids


def _plugged(vm: PlainQemu) -> dict[str, tuple[str, str]]:
    """{device id: (QOM type, root port)} of our devices, read from QEMU's QOM."""
    out = {}
    with vm.session() as qmp:
        for prop in qmp.cmd("qom-list", path="/machine/peripheral"):
            name, kind = prop["name"], prop["type"]
            if name.startswith("ep-") and kind.startswith("child<"):
                path = f"/machine/peripheral/{name}"
                assert qmp.cmd("qom-get", path=path, property="realized") is True
                bus = qmp.cmd("qom-get", path=path, property="parent_bus")
                out[name] = (kind[len("child<") : -1], str(bus).rstrip("/").split("/")[-2])
    return out


def _chardevs(vm: PlainQemu) -> set[str]:
    with vm.session() as qmp:
        return {c["label"] for c in qmp.cmd("query-chardev") if c["label"].startswith("ep-")}


def _daemon_view(vm: PlainQemu) -> tuple[dict[str, str], dict[str, str]]:
    """The running daemon's exports {id: node} and nodes {node: file}."""
    with vm.daemon.session() as qsd:
        exports = {e["id"]: e["node-name"] for e in qsd.cmd("query-block-exports")}
        nodes = {n["node-name"]: n["file"] for n in qsd.cmd("query-named-block-nodes")}
    return exports, nodes


def _daemon_pids(vm: PlainQemu) -> tuple[int, int]:
    state = vm.daemon.state()
    assert state is not None, "no daemon.json: no storage daemon runs for the VM"
    return state.supervisor_pid, state.qsd_pid


def test_three_attaches_share_one_daemon_and_the_last_detach_stops_it(
    vm: PlainQemu, files: list[Path]
) -> None:
    first = _attach(vm, files[0], files[1])
    pids = _daemon_pids(vm)
    run_dir = Path(os.environ.get(RUN_DIR_ENV, "/run/erofs-passthrough"))
    assert vm.daemon.dir.parent == run_dir / "qsd" and vm.daemon.dir.is_dir()
    third = _attach(vm, files[2])
    assert _daemon_pids(vm) == pids  # reused, not a second daemon
    atts = [*first, *third]
    ids = [a["device_id"] for a in atts]
    assert ids == [device_id_for(f, "vhost-user-blk") for f in files]
    assert [a["file"] for a in atts] == [str(f) for f in files]
    # QEMU has three realized vhost-user-blk-pci devices, one per root port
    assert _plugged(vm) == {a["device_id"]: ("vhost-user-blk-pci", a["root_port"]) for a in atts}
    assert len({a["root_port"] for a in atts}) == 3
    assert _chardevs(vm) == {a["chardev"] for a in atts}
    # the daemon exports each file read-only, and it is the one process holding them
    exports, nodes = _daemon_view(vm)
    assert exports == {a["export_id"]: a["node_name"] for a in atts}
    assert nodes == {a["node_name"]: a["file"] for a in atts}
    for f in files:
        assert _holders(f) == [pids[1]]
    assert all(Path(a["socket"]).is_socket() for a in atts)
    # again: idempotent, same answer, same daemon
    assert _attach(vm, files[2]) == third and _daemon_pids(vm) == pids

    _detach(vm, files[0], files[1])
    assert set(_plugged(vm)) == {ids[2]} and _daemon_pids(vm) == pids
    assert _daemon_view(vm)[0] == {ids[2]: atts[2]["node_name"]}
    assert _holders(files[0]) == [] and _holders(files[2]) == [pids[1]]

    assert [a["device_id"] for a in _detach(vm, files[2])] == [ids[2]]
    assert all(_gone(pid) for pid in pids), "the daemon outlived the last detach"
    assert not vm.daemon.dir.exists()
    assert _plugged(vm) == {} and _chardevs(vm) == set()
    assert [_holders(f) for f in files] == [[], [], []]
    assert vm.proc.poll() is None  # QEMU itself is fine


def test_the_daemon_does_not_outlive_qemu(vm: PlainQemu, files: list[Path]) -> None:
    _attach(vm, files[0])
    pids = _daemon_pids(vm)
    vm.proc.kill()
    vm.proc.wait()
    assert all(_gone(pid) for pid in pids), "the daemon outlived its QEMU"
    deadline = time.monotonic() + 10
    while vm.daemon.dir.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not vm.daemon.dir.exists()
    assert _holders(files[0]) == []


def _killed_attach(vm: PlainQemu, file: Path, step: str) -> None:
    """An attach (in a process of its own) SIGKILLed right before STEP, as a crash or a ^C'd
    kill -9 would leave it."""
    code = f"""
import os, signal
from passthrough.attach import Attacher
from passthrough.qmp import QmpSession

def die(step):
    if step == {step!r}:
        os.kill(os.getpid(), signal.SIGKILL)

with QmpSession({str(vm.qmp)!r}) as qmp:
    Attacher(qmp, before_step=die).attach({str(file)!r}, "vhost-user-blk")
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def test_a_killed_attach_leaves_a_daemon_that_is_found_and_reused(
    vm: PlainQemu, files: list[Path]
) -> None:
    _killed_attach(vm, files[0], "chardev-add")  # daemon up, export made, QEMU not connected
    pids = _daemon_pids(vm)
    assert list(_daemon_view(vm)[0]) == [device_id_for(files[0], "vhost-user-blk")]
    _killed_attach(vm, files[1], "device_add")  # ... and QEMU's chardev made
    assert _daemon_pids(vm) == pids
    assert _chardevs(vm) == {f"{device_id_for(files[1], 'vhost-user-blk')}-chr"}

    att = _attach(vm, files[2])[0]
    assert _daemon_pids(vm) == pids  # the leftover daemon is reused
    # ... and what the killed attaches left in it and in QEMU is gone
    assert _daemon_view(vm) == (
        {att["export_id"]: att["node_name"]},
        {att["node_name"]: str(files[2])},
    )
    assert _chardevs(vm) == {att["chardev"]}
    assert _holders(files[0]) == [] and _holders(files[1]) == []
    _detach(vm, files[2])
    assert all(_gone(pid) for pid in pids) and not vm.daemon.dir.exists()


def test_a_leftover_daemon_with_nothing_attached_is_stopped(
    vm: PlainQemu, files: list[Path]
) -> None:
    _killed_attach(vm, files[0], "qsd:blockdev-add")  # daemon started, nothing in it
    pids = _daemon_pids(vm)
    detach = _cli("detach", "--qmp", str(vm.qmp), "--json", str(files[0]))
    assert detach.returncode == 1
    assert json.loads(detach.stdout) == {"error": f"{files[0]} is not attached"}
    assert all(_gone(pid) for pid in pids) and not vm.daemon.dir.exists()


def test_a_dead_daemon_is_replaced_and_its_devices_still_detach(
    vm: PlainQemu, files: list[Path]
) -> None:
    first = _attach(vm, files[0])[0]
    supervisor, qsd = _daemon_pids(vm)
    os.kill(supervisor, signal.SIGKILL)  # the daemon dies with it (PR_SET_PDEATHSIG)
    assert _gone(qsd), "qemu-storage-daemon outlived its supervisor"
    second = _attach(vm, files[1])[0]
    new = _daemon_pids(vm)
    assert new != (supervisor, qsd)
    assert _daemon_view(vm)[0] == {second["export_id"]: second["node_name"]}
    assert set(_plugged(vm)) == {first["device_id"], second["device_id"]}
    _detach(vm, files[0], files[1])
    assert all(_gone(pid) for pid in new) and not vm.daemon.dir.exists()
    assert _plugged(vm) == {} and _chardevs(vm) == set()


def test_unshared_guest_ram_is_refused_before_anything_starts(
    workdir: Path, files: list[Path]
) -> None:
    require_tool("qemu-system-x86_64")
    vm = _start_qemu(workdir, shared_ram=False)
    try:
        proc = _cli(
            "attach", "--qmp", str(vm.qmp), "--transport", "vhost-user-blk", "--json", str(files[0])
        )
        assert proc.returncode == 1
        error = json.loads(proc.stdout)["error"]
        assert "pc.ram" in error and "share=on" in error
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
        assert not vm.daemon.dir.exists()
        with QmpSession(vm.qmp) as qmp, Attacher(qmp) as at, pytest.raises(GuestRamNotShared):
            at.attach(files[0], "vhost-user-blk")
        assert not vm.daemon.dir.exists() and _plugged(vm) == {} and _chardevs(vm) == set()
        # QEMU's own transport needs no shared RAM
        assert _cli("attach", "--qmp", str(vm.qmp), str(files[0])).returncode == 0
    finally:
        _stop(vm)


def test_concurrent_attaches_to_one_vm_start_one_daemon(vm: PlainQemu, files: list[Path]) -> None:
    """Three attach processes at once on a VM without a daemon: the per-VM flock makes them
    start one daemon and take three different root ports."""
    procs = [
        subprocess.Popen(
            [
                *CLI,
                "attach",
                "--qmp",
                str(vm.qmp),
                "--transport",
                "vhost-user-blk",
                "--json",
                str(f),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for f in files
    ]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err for _, err in outs]
    atts = [json.loads(out)["attached"][0] for out, _ in outs]
    assert len({a["root_port"] for a in atts}) == 3
    assert set(_daemon_view(vm)[0]) == {a["export_id"] for a in atts}
    supervisor, _ = _daemon_pids(vm)
    daemons = [
        int(p.name)
        for p in Path("/proc").iterdir()
        if p.name.isdigit()
        and _cmdline(int(p.name)).count(str(vm.daemon.dir))
        and "passthrough.storage_daemon" in _cmdline(int(p.name))
    ]
    assert daemons == [supervisor]


def test_the_vm_lock_is_held_for_the_whole_attach(vm: PlainQemu, files: list[Path]) -> None:
    """At every step of an attach, including those after it started the daemon (which
    replaces the runtime directory's files), nobody else can take the VM's lock."""
    seen: dict[str, bool] = {}

    def probe(step: str) -> None:
        # a process of its own, as a second attacher or the supervisor would be
        code = (
            f"import sys; from passthrough.storage_daemon import VmDaemon as D; "
            f"d = D({str(vm.qmp)!r})\n"
            f"with __import__('passthrough.storage_daemon').storage_daemon._flocked("
            f"d.dir, d.lock_path, blocking=False) as got: sys.exit(10 if got else 0)"
        )
        seen[step] = (
            subprocess.run([sys.executable, "-c", code], check=False, timeout=30).returncode == 0
        )

    with QmpSession(vm.qmp) as qmp, Attacher(qmp, before_step=probe) as at:
        at.attach(files[0], "vhost-user-blk")
    assert seen == dict.fromkeys(
        ["daemon", "qsd:blockdev-add", "qsd:block-export-add", "chardev-add", "device_add"], True
    )


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_daemons_of_vanished_vms_are_reaped(
    vm: PlainQemu, workdir: Path, files: list[Path]
) -> None:
    """A daemon whose supervisor was killed (so nobody cleaned up) and whose QEMU is gone is
    removed by the next attach to any VM."""
    other_dir = workdir / "other"
    other_dir.mkdir()
    other = _start_qemu(other_dir)
    try:
        _attach(other, files[0])
        supervisor, qsd = _daemon_pids(other)
        os.kill(supervisor, signal.SIGKILL)
        assert _gone(qsd)
        other.proc.kill()
        other.proc.wait()
        assert other.daemon.dir.exists()  # nobody left to clean it
        _attach(vm, files[1])
        assert not other.daemon.dir.exists()
        assert reap_orphans() == []
    finally:
        _stop(other)
