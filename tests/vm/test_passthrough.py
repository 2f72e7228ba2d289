"""QMP attach/detach against a real QEMU and qemu-storage-daemon, with the VM paused (-S):
what QEMU accepts, what it keeps, and that failures leave nothing behind. Detach needs a guest
that releases the device, so it is tested with a booted guest in test_vm_guest.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from passthrough.attach import TRANSPORTS, Attacher, device_id_for
from passthrough.errors import NotAttached, PassthroughError, PoolExhausted, QmpGone
from passthrough.storage_daemon import VmDaemon
from passthrough.vm import Vm, VmConfig
from tests.support.helpers import require_tool

pytestmark = pytest.mark.qemu


def _require_qemu() -> None:
    require_tool("qemu-system-x86_64")
    require_tool("qemu-storage-daemon")


@pytest.fixture
def vm() -> Iterator[Vm]:
    _require_qemu()
    with Vm(VmConfig(paused=True, root_ports=2)) as machine:
        yield machine


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    out = []
    for i in range(3):
        p = tmp_path / f"blob{i}.img"
        p.write_bytes(bytes([i]) * 8192)
        out.append(p)
    return out


def _qemu_nodes(vm: Vm) -> set[str]:
    return {n["node-name"] for n in vm.qmp.cmd("query-named-block-nodes")}


def _qemu_chardevs(vm: Vm) -> set[str]:
    return {c["label"] for c in vm.qmp.cmd("query-chardev")} - {"qmp", "qmp-vm", "con", "agent"}


def _qsd_state(vm: Vm) -> tuple[list, set[str]]:
    with vm.qsd.session() as qsd:  # type: ignore[union-attr]
        exports = qsd.cmd("query-block-exports")
        nodes = {n["node-name"] for n in qsd.cmd("query-named-block-nodes")}
    return exports, nodes


def test_device_ids_are_stable_short_and_per_transport(tmp_path: Path) -> None:
    a = device_id_for(tmp_path / "x", "virtio-blk")
    assert a == device_id_for(str(tmp_path / "." / "x"), "virtio-blk")
    assert a != device_id_for(tmp_path / "x", "vhost-user-blk")
    assert a != device_id_for(tmp_path / "y", "virtio-blk")
    assert len(a.encode()) <= 20  # virtio-blk serials hold 20 bytes
    with pytest.raises(PassthroughError, match="unknown transport"):
        device_id_for(tmp_path / "x", "nvme")


def test_cli_offers_the_transports_without_loading_the_attacher() -> None:
    """`erofs-passthrough` registers attach's --transport choices for every subcommand: from
    passthrough.transports, without importing asyncio and qemu.qmp through the attacher."""
    code = (
        "import sys, passthrough.cli as c; print(c.TRANSPORTS, "
        "[m for m in ('passthrough.attach', 'qemu.qmp') if m in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    assert out.strip() == f"{TRANSPORTS} []"


def test_virtio_blk_attach_is_idempotent(vm: Vm, files: list[Path]) -> None:
    with Attacher(vm.qmp) as at:
        first = at.attach(files[0], "virtio-blk")
        again = at.attach(files[0], "virtio-blk")
        assert again == first
        assert first.serial == first.device_id
        assert first.root_port == "ep-rp0" and first.pci_slot == "0000:00:08.0"
        assert [a.device_id for a in at.attached()] == [first.device_id]
        assert at.attached()[0].file == str(files[0])
        assert at.free_ports() == ["ep-rp1"]
    assert _qemu_nodes(vm) == {first.node_name, f"{first.device_id}-file"}
    blocks = [
        b
        for b in vm.qmp.cmd("query-block")
        if b.get("inserted", {}).get("node-name") == first.node_name
    ]
    assert len(blocks) == 1 and blocks[0]["inserted"]["ro"] is True


def test_vhost_user_blk_attach_exports_through_the_storage_daemon(
    vm: Vm, files: list[Path]
) -> None:
    with Attacher(vm.qmp) as at:
        att = at.attach(files[1], "vhost-user-blk")
        assert at.attach(files[1], "vhost-user-blk") == att
        assert att.serial == "vhost_user_blk"
        assert att.socket is not None and Path(att.socket).is_socket()
        assert at.attached()[0].file == str(files[1])
    exports, nodes = _qsd_state(vm)
    assert [(e["id"], e["type"], e["node-name"]) for e in exports] == [
        (att.export_id, "vhost-user-blk", att.node_name)
    ]
    assert nodes == {att.node_name}
    assert _qemu_chardevs(vm) == {att.chardev}
    assert _qemu_nodes(vm) == set()  # QEMU itself opens nothing for vhost-user-blk


def test_missing_file_is_a_clear_error_and_attaches_nothing(vm: Vm, tmp_path: Path) -> None:
    with Attacher(vm.qmp) as at:
        for transport in TRANSPORTS:
            with pytest.raises(PassthroughError, match="No such file"):
                at.attach(tmp_path / "nope.img", transport)
        assert at.attached() == [] and at.free_ports() == ["ep-rp0", "ep-rp1"]
    assert _qemu_nodes(vm) == set() and _qemu_chardevs(vm) == set()


def test_pool_exhausted_is_clean(vm: Vm, files: list[Path]) -> None:
    with Attacher(vm.qmp) as at:
        at.attach(files[0], "virtio-blk")
        at.attach(files[1], "vhost-user-blk")
        nodes, chardevs, qsd = _qemu_nodes(vm), _qemu_chardevs(vm), _qsd_state(vm)
        for transport in TRANSPORTS:
            with pytest.raises(PoolExhausted, match="no free pcie-root-port"):
                at.attach(files[2], transport)
        assert len(at.attached()) == 2
    assert (_qemu_nodes(vm), _qemu_chardevs(vm), _qsd_state(vm)) == (nodes, chardevs, qsd)


def test_detach_of_unknown_device_is_an_error(vm: Vm, files: list[Path]) -> None:
    with Attacher(vm.qmp) as at:
        with pytest.raises(NotAttached):
            at.detach(files[0])
        with pytest.raises(NotAttached):
            at.detach("ep-b-000000000000")


def test_storage_daemon_dead_before_attach(vm: Vm, files: list[Path]) -> None:
    assert vm.qsd is not None
    vm.qsd.proc.kill()  # type: ignore[union-attr]
    vm.qsd.proc.wait()  # type: ignore[union-attr]
    with Attacher(vm.qmp) as at:
        with pytest.raises(QmpGone):
            at.attach(files[0], "vhost-user-blk")
        assert at.attached() == [] and at.free_ports() == ["ep-rp0", "ep-rp1"]
        assert _qemu_chardevs(vm) == set()
        # QEMU's own transport does not need the daemon.
        assert at.attach(files[0], "virtio-blk").root_port == "ep-rp0"


def test_storage_daemon_dying_mid_attach_leaves_nothing_in_qemu(vm: Vm, files: list[Path]) -> None:
    def kill_qsd(step: str) -> None:
        if step == "chardev-add":  # the export exists; QEMU has not connected yet
            vm.qsd.proc.kill()  # type: ignore[union-attr]
            vm.qsd.proc.wait()  # type: ignore[union-attr]

    with Attacher(vm.qmp, before_step=kill_qsd) as at:
        with pytest.raises(PassthroughError) as err:
            at.attach(files[0], "vhost-user-blk")
        assert "chardev-add" in str(err.value)
        assert at.free_ports() == ["ep-rp0", "ep-rp1"]
    assert _qemu_chardevs(vm) == set() and _qemu_nodes(vm) == set()


def test_qemu_dying_mid_attach_rolls_back_the_export(vm: Vm, files: list[Path]) -> None:
    def kill_qemu(step: str) -> None:
        if step == "chardev-add":
            vm.proc.kill()  # type: ignore[union-attr]
            vm.proc.wait()  # type: ignore[union-attr]

    with Attacher(vm.qmp, before_step=kill_qemu) as at, pytest.raises(QmpGone):
        at.attach(files[0], "vhost-user-blk")
    assert _qsd_state(vm) == ([], set())  # export and node removed again
    sockets = [p for p in vm.workdir.iterdir() if p.name.endswith(".vhost.sock")]
    assert sockets == []


def test_qemu_refusing_device_add_rolls_back_everything(vm: Vm, files: list[Path]) -> None:
    """A refused device_add (here: its backend vanished under it) undoes the steps before it."""
    for transport in TRANSPORTS:
        dev = device_id_for(files[0], transport)

        def pull_backend(step: str, dev: str = dev, transport: str = transport) -> None:
            if step != "device_add":
                return
            if transport == "virtio-blk":
                vm.qmp.cmd("blockdev-del", **{"node-name": f"{dev}-node"})
            else:
                vm.qmp.cmd("chardev-remove", id=f"{dev}-chr")

        with Attacher(vm.qmp, before_step=pull_backend) as at:
            before = (_qemu_nodes(vm), _qemu_chardevs(vm), _qsd_state(vm))
            with pytest.raises(PassthroughError, match="device_add"):
                at.attach(files[0], transport)
            assert (_qemu_nodes(vm), _qemu_chardevs(vm), _qsd_state(vm)) == before
            assert at.attached() == [] and at.free_ports() == ["ep-rp0", "ep-rp1"]


def test_leftovers_of_a_killed_attacher_are_cleaned(vm: Vm, files: list[Path]) -> None:
    dev = device_id_for(files[0], "virtio-blk")
    vm.qmp.cmd(
        "blockdev-add",
        **{
            "driver": "raw",
            "node-name": f"{dev}-node",
            "read-only": True,
            "file": {"driver": "file", "filename": str(files[0]), "read-only": True},
        },
    )
    with Attacher(vm.qmp) as at:
        att = at.attach(files[0], "virtio-blk")  # would be "Duplicate nodes" without cleanup
        assert att.device_id == dev
    assert _qemu_nodes(vm) == {f"{dev}-node", f"{dev}-file"}


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shim_integration.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_attach_json_and_errors(vm: Vm, files: list[Path]) -> None:
    qmp = str(vm.qmp_path)
    first = _cli("attach", "--qmp", qmp, "--json", str(files[0]))
    assert first.returncode == 0, first.stderr
    out = json.loads(first.stdout)["attached"]
    assert [(a["transport"], a["file"], a["root_port"]) for a in out] == [
        ("virtio-blk", str(files[0]), "ep-rp0")
    ]
    again = _cli("attach", "--qmp", qmp, "--json", str(files[0]))
    assert json.loads(again.stdout) == json.loads(first.stdout)

    vhost = _cli("attach", "--qmp", qmp, "--transport", "vhost-user-blk", "--json", str(files[1]))
    assert vhost.returncode == 0, vhost.stderr
    assert json.loads(vhost.stdout)["attached"][0]["serial"] == "vhost_user_blk"
    # the launcher's daemon (qsd.sock beside qmp.sock) serves it; attach started none
    assert [e["id"] for e in _qsd_state(vm)[0]] == [device_id_for(files[1], "vhost-user-blk")]
    assert not VmDaemon(vm.qmp_path).dir.exists()

    missing = _cli("attach", "--qmp", qmp, str(files[2]) + ".missing")
    assert missing.returncode == 1 and "No such file" in missing.stderr
    full = _cli("attach", "--qmp", qmp, str(files[2]))
    assert full.returncode == 1 and "no free pcie-root-port" in full.stderr
    unknown = _cli("detach", "--qmp", qmp, str(files[2]))
    assert unknown.returncode == 1 and "not attached" in unknown.stderr
    gone = _cli("attach", "--qmp", str(vm.workdir / "no-such.sock"), str(files[0]))
    assert gone.returncode == 1 and "erofs-passthrough attach:" in gone.stderr
    with Attacher(vm.qmp) as at:
        assert len(at.attached()) == 2


def test_cli_json_errors_are_one_json_object_on_stdout(vm: Vm, files: list[Path]) -> None:
    """With --json a caller parses stdout: an error is {"error": ...} there (and the usual
    one line on stderr, exit 1), never a traceback or nothing."""
    qmp = str(vm.qmp_path)
    assert _cli("attach", "--qmp", qmp, str(files[0]), str(files[1])).returncode == 0
    cases = [
        (["attach", "--qmp", qmp, "--json", f"{files[2]}.missing"], "No such file"),
        (["attach", "--qmp", qmp, "--json", str(files[2])], "no free pcie-root-port"),
        (
            ["attach", "--qmp", qmp, "--transport", "vhost-user-blk", "--json", str(files[2])],
            "no free pcie-root-port",
        ),
        (["detach", "--qmp", qmp, "--json", str(files[2])], "is not attached"),
        (
            ["attach", "--qmp", str(vm.workdir / "no-such.sock"), "--json", str(files[0])],
            "no-such.sock",
        ),
        (
            ["detach", "--qmp", str(vm.workdir / "no-such.sock"), "--json", str(files[0])],
            "no-such.sock",
        ),
    ]
    for args, text in cases:
        proc = _cli(*args)
        assert proc.returncode == 1, (args, proc.stdout, proc.stderr)
        error = json.loads(proc.stdout)["error"]
        assert text in error, (args, error)
        assert proc.stderr == f"erofs-passthrough {args[0]}: {error}\n"
    with Attacher(vm.qmp) as at:
        assert {a.file for a in at.attached()} == {str(files[0]), str(files[1])}


def test_vm_failure_carries_the_reason(tmp_path: Path) -> None:
    _require_qemu()
    from passthrough.errors import VmFailure

    bad = VmConfig(paused=True, root_ports=1, accel="nosuch")
    vm = Vm(bad, workdir=tmp_path)
    try:
        with pytest.raises(VmFailure, match=r"exited with .*nosuch"):
            vm.start()
    finally:
        vm.stop()  # whatever happened, leave no QEMU or storage daemon behind
    assert not any(p.suffix == ".sock" and p.exists() and _listening(p) for p in tmp_path.iterdir())


def _listening(path: Path) -> bool:
    import socket

    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def test_stop_reaps_qemu_and_storage_daemon() -> None:
    _require_qemu()
    vm = Vm(VmConfig(paused=True, root_ports=1)).start()
    pids = [vm.proc.pid, vm.qsd.proc.pid]  # type: ignore[union-attr]
    vm.stop()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not vm.workdir.exists()
