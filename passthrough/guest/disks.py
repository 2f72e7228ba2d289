"""The guest's virtio disks: list them, wait for a hotplugged one, wait for one to go.

No udevd runs in the guest, so everything comes from sysfs attributes through pyudev (udev's
ID_SERIAL etc. would be empty); kernel uevents (pyudev's monitor) make a hotplug seen at once.
"""

from __future__ import annotations

import errno
import os
import time

from passthrough.guest.state import AgentError, AgentState

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def _is_pci_addr(part: str) -> bool:
    # 0000:00:02.3
    return len(part) == 12 and part[4] == ":" and part[7] == ":" and part[10] == "."


def block_info(device: Any) -> dict[str, Any]:
    """A pyudev block Device as the protocol reports it."""
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


def list_disks(state: AgentState) -> list[dict[str, Any]]:
    """The guest's virtio disks (pyudev enumeration of block devices of type disk)."""
    disks = state.udev().list_devices(subsystem="block", DEVTYPE="disk")
    return sorted(
        (block_info(d) for d in disks if d.sys_name.startswith("vd")), key=lambda d: d["name"]
    )


def _matches(info: dict[str, Any], serial: str | None, pci: str | None) -> bool:
    if serial is not None and info["serial"] != serial:
        return False
    return not (pci is not None and pci not in info["pci_path"])


def _udev_monitor(state: AgentState) -> Any:
    import pyudev

    monitor = pyudev.Monitor.from_netlink(state.udev(), source="kernel")
    monitor.filter_by("block")
    monitor.start()
    return monitor


def wait_block(
    state: AgentState, serial: str | None, pci: str | None, timeout: float
) -> dict[str, Any]:
    """Wait for a disk with SERIAL (virtio-blk) and/or behind PCI address PCI (vhost-user-blk,
    whose serial is fixed)."""
    if serial is None and pci is None:
        raise AgentError("wait_block needs serial or pci", errno.EINVAL)
    monitor = _udev_monitor(state)  # listen first, then look: no event falls between the two
    deadline = time.monotonic() + timeout
    while True:
        for info in list_disks(state):
            if _matches(info, serial, pci) and info["size"]:
                return info
        left = deadline - time.monotonic()
        if left <= 0:
            raise AgentError(
                f"no disk with serial={serial} pci={pci} after {timeout}s", errno.ENODEV
            )
        monitor.poll(timeout=min(left, 0.5))


def wait_block_gone(name: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/sys/block/{name}"):
        if time.monotonic() > deadline:
            raise AgentError(f"{name} still present after {timeout}s", errno.EBUSY)
        time.sleep(0.01)
    return {"gone": name}
