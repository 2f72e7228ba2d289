"""The containerd service: store, layout, mounts, gRPC Snapshots and Diff, config, server.

For a runtime, `mounts.Mount` is what the snapshotter hands over and `vm_mode.ChainImage` the
device description of a VM-mode chain. The names below are imported from their modules on
first use, so importing the package loads neither gRPC nor a compressor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from snapshotter.lazy_exports import lazy_exports

if TYPE_CHECKING:
    from snapshotter.service.layout import (
        Layout,
    )
    from snapshotter.service.mounts import (
        Mount,
    )
    from snapshotter.service.serve import (
        Server,
    )
    from snapshotter.service.snapshots import (
        Snapshotter,
    )
    from snapshotter.service.store import (
        Info,
        Kind,
        Store,
        Usage,
    )
    from snapshotter.service.vm_mode import (
        ChainImage,
    )

__all__ = [
    "Mount",
    "ChainImage",
    "Snapshotter",
    "Server",
    "Store",
    "Kind",
    "Info",
    "Usage",
    "Layout",
]

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "Mount": "snapshotter.service.mounts",
        "ChainImage": "snapshotter.service.vm_mode",
        "Snapshotter": "snapshotter.service.snapshots",
        "Server": "snapshotter.service.serve",
        "Store": "snapshotter.service.store",
        "Kind": "snapshotter.service.store",
        "Info": "snapshotter.service.store",
        "Usage": "snapshotter.service.store",
        "Layout": "snapshotter.service.layout",
    },
    globals(),
)
