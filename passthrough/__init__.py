"""Attaching verified devices to QEMU guests over QMP.

- `attach`: virtio-blk / vhost-user-blk attach and detach, state read back from QEMU
- `qmp`: synchronous QMP sessions (qemu.qmp) for QEMU and qemu-storage-daemon
- `errors`: the passthrough errors (PassthroughError and below, under snapshotter's EpError)
- `agent_client`, `guest_volume`: the host side of the guest agent protocol
- `vm`, `storage_daemon`, `procs`: the test/demo VM launcher and its helper processes
- `guest_image`: the kernel, initramfs and verified root built by vm-images/build
- `guest`: the guest agent itself (runs inside the VM)
- `cli`: `erofs-passthrough attach|detach`

The names below are imported from their modules on first use. See docs/passthrough.md and
docs/api.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from snapshotter.lazy_exports import lazy_exports

if TYPE_CHECKING:
    from passthrough.agent_client import (
        AgentClient as AgentClient,
    )
    from passthrough.attach import (
        Attacher as Attacher,
    )
    from passthrough.attach import (
        Attachment as Attachment,
    )
    from passthrough.attach import (
        device_id_for as device_id_for,
    )
    from passthrough.errors import (
        AgentFailure as AgentFailure,
    )
    from passthrough.errors import (
        GuestRamNotShared as GuestRamNotShared,
    )
    from passthrough.errors import (
        NotAttached as NotAttached,
    )
    from passthrough.errors import (
        PassthroughError as PassthroughError,
    )
    from passthrough.errors import (
        PoolExhausted as PoolExhausted,
    )
    from passthrough.errors import (
        QmpCommandError as QmpCommandError,
    )
    from passthrough.errors import (
        QmpGone as QmpGone,
    )
    from passthrough.errors import (
        QmpTimeout as QmpTimeout,
    )
    from passthrough.errors import (
        StorageDaemonFailure as StorageDaemonFailure,
    )
    from passthrough.errors import (
        VmFailure as VmFailure,
    )
    from passthrough.guest_volume import (
        find_disk as find_disk,
    )
    from passthrough.guest_volume import (
        open_verity as open_verity,
    )
    from passthrough.qmp import (
        QmpSession as QmpSession,
    )
    from passthrough.vm import (
        Vm as Vm,
    )
    from passthrough.vm import (
        VmConfig as VmConfig,
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

__getattr__, __dir__ = lazy_exports(__name__, {
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
}, globals())
