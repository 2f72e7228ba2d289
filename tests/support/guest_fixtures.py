"""The one TCG guest the guest tests share (session scope: booting costs seconds), and the check
that every test leaves it as it was booted.

The guest boots with the test signing key's public key on its command line
(`ep.trusted_keys=`), so tests can open signed images; `guest_key` is that key's private half.
conftest.py imports these fixtures so every test module sees them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from passthrough.agent_client import AgentClient
from passthrough.attach import Attacher
from passthrough.guest_image import GuestImage, ensure_guest_image
from passthrough.vm import Vm, VmConfig
from tests.support.helpers import require_tool


def require_guest() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: the guest image build runs debootstrap (runs in CI as root)")
    for tool in ("qemu-system-x86_64", "qemu-storage-daemon", "debootstrap", "lz4", "mkfs.erofs"):
        require_tool(tool)


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    require_guest()
    return ensure_guest_image()


@pytest.fixture(scope="session")
def guest_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The private key whose public half the shared guest trusts (KEY.pub beside it)."""
    from snapshotter.manifest import generate_key

    path = tmp_path_factory.mktemp("guest-key") / "trusted.key"
    generate_key(path)
    return path


@pytest.fixture(scope="session")
def vm(guest_image: GuestImage, guest_key: Path) -> Iterator[Vm]:
    trusted = [Path(f"{guest_key}.pub").read_bytes()]
    with Vm(VmConfig.for_guest(guest_image, root_ports=8, trusted_keys=trusted)) as machine:
        yield machine


@pytest.fixture(scope="session")
def agent(vm: Vm) -> Iterator[AgentClient]:
    client = vm.wait_agent(timeout=120)
    yield client
    client.close()


@pytest.fixture(scope="session")
def attacher(vm: Vm) -> Iterator[Attacher]:
    with Attacher(vm.qmp) as at:
        yield at


@pytest.fixture(autouse=True)
def clean_guest(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test that uses the guest: tear down what the agent set up, detach
    everything, and check that the guest and QEMU are back to the booted state."""
    if "agent" not in request.fixturenames:
        yield
        return
    vm: Vm = request.getfixturevalue("vm")
    agent: AgentClient = request.getfixturevalue("agent")
    attacher: Attacher = request.getfixturevalue("attacher")
    yield
    agent.teardown()
    for att in attacher.attached():
        attacher.detach(att.device_id)
    assert_clean(vm, agent, attacher)


def _pci_ids(devices: list[dict[str, Any]]) -> set[str]:
    ids = set()
    for dev in devices:
        if dev.get("qdev_id"):
            ids.add(dev["qdev_id"])
        ids |= _pci_ids(dev.get("pci_bridge", {}).get("devices", []))
    return ids


def assert_clean(vm: Vm, agent: AgentClient, attacher: Attacher) -> None:
    assert [d["name"] for d in agent.block_devices()] == ["vda"]
    assert agent.call("mounts") == {"mounts": [], "dm": []}
    assert agent.call("images") == {"images": {}}
    dm = agent.run("dmsetup", "ls")["stdout"]
    assert dm.split()[:1] == ["root"] and len(dm.splitlines()) == 1, dm
    nodes = {n["node-name"] for n in vm.qmp.cmd("query-named-block-nodes")}
    assert not [n for n in nodes if n.startswith("ep-")], nodes
    assert not [
        b
        for b in vm.qmp.cmd("query-block")
        if b.get("qdev", "").startswith("/machine/peripheral/ep-")
    ]
    pci = set().union(*(_pci_ids(bus["devices"]) for bus in vm.qmp.cmd("query-pci")))
    assert not [i for i in pci if i.startswith("ep-") and not i.startswith("ep-rp")], pci
    assert not [c for c in vm.qmp.cmd("query-chardev") if c["label"].startswith("ep-")]
    with vm.qsd.session() as qsd:  # type: ignore[union-attr]
        assert qsd.cmd("query-block-exports") == []
        assert qsd.cmd("query-named-block-nodes") == []
    assert attacher.attached() == []
