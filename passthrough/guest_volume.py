"""Host-side steps that make an attached, verity-protected EROFS blob usable in the guest:
find the hotplugged disk, open dm-verity over it with the root hash, mount it."""

from __future__ import annotations

from typing import Any

from passthrough.agent_client import AgentClient
from passthrough.attach import Attachment


def find_disk(agent: AgentClient, att: Attachment, timeout: float = 10.0) -> dict[str, Any]:
    """The guest's view of ATT: by serial for virtio-blk, by root port PCI address for
    vhost-user-blk (whose serial is always "vhost_user_blk")."""
    if att.transport == "virtio-blk":
        return agent.wait_block(serial=att.serial, timeout=timeout)
    return agent.wait_block(pci=att.pci_slot, timeout=timeout)


def verity_params(verity: dict[str, Any], data_device: str,
                  hash_device: str | None = None) -> dict[str, Any]:
    """Agent `verity_open` fields from a `convert/verity format --json` verity object (tree
    appended to the data with a v1 superblock unless HASH_DEVICE is given)."""
    dbs = int(verity["data_block_size"])
    blocks = int(verity.get("data_blocks") or int(verity["hash_offset"]) // dbs)
    start = verity.get("hash_start_block")
    if start is None:
        start = int(verity["hash_offset"]) // int(verity["hash_block_size"])
        start += 1 if verity.get("superblock", True) else 0
    return {"data_device": data_device, "hash_device": hash_device or data_device,
            "data_blocks": blocks, "hash_start_block": int(start),
            "data_block_size": dbs, "hash_block_size": int(verity["hash_block_size"]),
            "hash_type": int(verity.get("hash_type", 1)),
            "algorithm": verity.get("hash_name", "sha256"),
            "root_hash": verity["root_hash"], "salt": verity.get("salt") or "-"}


def open_verity(agent: AgentClient, name: str, device: str, verity: dict[str, Any]) -> str:
    """dm-verity device NAME over DEVICE; returns /dev/mapper/NAME."""
    return agent.verity_open(name, **verity_params(verity, device))
