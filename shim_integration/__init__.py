"""What a Kata-style runtime needs: the attach plan, Kata volumes, signed manifests, keys.

`plan_from_mounts` turns the snapshotter's mounts into the devices to attach; `Shim` drives a
VM through our guest agent; `volumes_from_devices` gives Kata's own volume options instead.
`testbed` holds the demo and its private containerd; `cli` the root CLI. The names below are
imported from their modules on first use. See docs/api.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from snapshotter.lazy_exports import lazy_exports

if TYPE_CHECKING:
    from shim_integration.kata_volume import (
        KataVirtualVolume,
        volumes_from_devices,
    )
    from shim_integration.publish import (
        PublishError,
        fetch_manifest,
        publish,
        verify_directory,
    )
    from shim_integration.registry import (
        Reference,
        RegistryClient,
        RegistryError,
    )
    from shim_integration.shim import (
        AttachPlan,
        ImageRefused,
        OpenedImage,
        PlannedDevice,
        Shim,
        ShimError,
        devices_of,
        plan_from_fetched,
        plan_from_mounts,
    )

__all__ = [
    "plan_from_mounts",
    "plan_from_fetched",
    "AttachPlan",
    "PlannedDevice",
    "devices_of",
    "Shim",
    "OpenedImage",
    "ShimError",
    "ImageRefused",
    "volumes_from_devices",
    "KataVirtualVolume",
    "publish",
    "fetch_manifest",
    "verify_directory",
    "PublishError",
    "Reference",
    "RegistryClient",
    "RegistryError",
]

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "plan_from_mounts": "shim_integration.shim",
        "plan_from_fetched": "shim_integration.shim",
        "AttachPlan": "shim_integration.shim",
        "PlannedDevice": "shim_integration.shim",
        "devices_of": "shim_integration.shim",
        "Shim": "shim_integration.shim",
        "OpenedImage": "shim_integration.shim",
        "ShimError": "shim_integration.shim",
        "ImageRefused": "shim_integration.shim",
        "volumes_from_devices": "shim_integration.kata_volume",
        "KataVirtualVolume": "shim_integration.kata_volume",
        "publish": "shim_integration.publish",
        "fetch_manifest": "shim_integration.publish",
        "verify_directory": "shim_integration.publish",
        "PublishError": "shim_integration.publish",
        "Reference": "shim_integration.registry",
        "RegistryClient": "shim_integration.registry",
        "RegistryError": "shim_integration.registry",
    },
    globals(),
)
