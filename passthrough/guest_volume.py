"""Host-side steps that make an attached, verity-protected EROFS blob usable in the guest:
find the hotplugged disk, open dm-verity over it with the root hash, mount it."""

from __future__ import annotations

from typing import Any

from passthrough.agent_client import AgentClient
from passthrough.attach import Attachment
from snapshotter.verity import VerityInfo


def find_disk(agent: AgentClient, att: Attachment, timeout: float = 10.0) -> dict[str, Any]:
    """The guest's view of ATT: by serial for virtio-blk, by root port PCI address for
    vhost-user-blk (whose serial is always "vhost_user_blk")."""
    if att.transport == "virtio-blk":
        return agent.wait_block(serial=att.serial, timeout=timeout)
    return agent.wait_block(pci=att.pci_slot, timeout=timeout)


def open_verity(agent: AgentClient, name: str, device: str, verity: dict[str, Any]) -> str:
    """dm-verity device NAME over DEVICE, VERITY a `convert/verity format --json` verity
    object (VerityInfo's JSON; the tree appended to the data); returns /dev/mapper/NAME."""
    return agent.verity_open(name, VerityInfo.from_json(verity).table_line(device, device))
