"""Attaching verified devices to QEMU guests over QMP.

- `attach`: virtio-blk / vhost-user-blk attach and detach, state read back from QEMU
- `qmp`: synchronous QMP sessions (qemu.qmp) for QEMU and qemu-storage-daemon
- `errors`: the passthrough errors (PassthroughError and below, under snapshotter's EpError)
- `agent_client`, `guest_volume`: the host side of the guest agent protocol
- `vm`, `storage_daemon`, `procs`: the test/demo VM launcher and its helper processes
- `guest_image`: the kernel, initramfs and verified root built by vm-images/build
- `agent_protocol`: that protocol's one definition (port, requests, replies, `ep.*` arguments)
- `transports`: the transports, for the CLI without the attacher
- `guest`: the guest program (the agent), shipped in the guest image (`guest/payload.py`)
- `cli`: `erofs-passthrough attach|detach`

The names below are imported from their modules on first use. See docs/passthrough.md and
docs/api.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from passthrough.agent_client import (
        AgentClient,
    )
    from passthrough.attach import (
        Attacher,
        Attachment,
        device_id_for,
    )
    from passthrough.errors import (
        AgentFailure,
        GuestRamNotShared,
        NotAttached,
        PassthroughError,
        PoolExhausted,
        QmpCommandError,
        QmpGone,
        QmpTimeout,
        StorageDaemonFailure,
        VmFailure,
    )
    from passthrough.guest_volume import (
        find_disk,
        open_verity,
    )
    from passthrough.qmp import (
        QmpSession,
    )
    from passthrough.vm import (
        Vm,
        VmConfig,
    )

__all__ = [
    "Attacher",
    "Attachment",
    "device_id_for",
    "QmpSession",
    "PassthroughError",
    "QmpGone",
    "QmpCommandError",
    "QmpTimeout",
    "PoolExhausted",
    "NotAttached",
    "AgentFailure",
    "VmFailure",
    "StorageDaemonFailure",
    "GuestRamNotShared",
    "AgentClient",
    "find_disk",
    "open_verity",
    "Vm",
    "VmConfig",
]

# Standard library only, unlike the other packages' `lazy_exports`: the guest image ships
# this file with a few modules of the package and nothing else.
_EXPORTS = {
    "Attacher": "passthrough.attach",
    "Attachment": "passthrough.attach",
    "device_id_for": "passthrough.attach",
    "QmpSession": "passthrough.qmp",
    "PassthroughError": "passthrough.errors",
    "QmpGone": "passthrough.errors",
    "QmpCommandError": "passthrough.errors",
    "QmpTimeout": "passthrough.errors",
    "PoolExhausted": "passthrough.errors",
    "NotAttached": "passthrough.errors",
    "AgentFailure": "passthrough.errors",
    "VmFailure": "passthrough.errors",
    "StorageDaemonFailure": "passthrough.errors",
    "GuestRamNotShared": "passthrough.errors",
    "AgentClient": "passthrough.agent_client",
    "find_disk": "passthrough.guest_volume",
    "open_verity": "passthrough.guest_volume",
    "Vm": "passthrough.vm",
    "VmConfig": "passthrough.vm",
}


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
