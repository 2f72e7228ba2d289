"""The ways passthrough hands a file to the guest as a disk, in one light module: the CLI
offers them without importing the attacher."""

from __future__ import annotations

__all__ = ["TRANSPORTS"]

#: virtio-blk: QEMU opens the file (serial = device id); vhost-user-blk: the storage daemon
#: exports it (the guest finds it by PCI address).
TRANSPORTS = ("virtio-blk", "vhost-user-blk")
