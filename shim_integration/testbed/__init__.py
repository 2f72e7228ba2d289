"""The demo and its test bed: a private containerd, OCI archives, a local registry.

Not a runtime API: the submodules below are what `make demo` and the tests use, imported on
first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from snapshotter.lazy_exports import lazy_exports

if TYPE_CHECKING:
    from shim_integration.testbed import (
        containerd_dist,
        containerd_private,
        demo,
        local_registry,
        oci_archive,
    )

__all__ = [
    "demo",
    "containerd_private",
    "containerd_dist",
    "oci_archive",
    "local_registry",
]

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "demo": "",
        "containerd_private": "",
        "containerd_dist": "",
        "oci_archive": "",
        "local_registry": "",
    },
    globals(),
)
