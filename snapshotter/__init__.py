"""EROFS layers, dm-verity and the containerd-facing services.

Layers, lowest first (each imports only those below it): `erofs` (the on-disk format),
`verity` (dm-verity trees; standard library only, the guest ships it), `ingest` (tar and
directory import, conversion), `fsmeta` (the merge), `service` (the containerd snapshotter and
differ). `manifest` is the signed root manifest: the snapshotter signs, the runtime reads,
the guest verifies. `errors` is the one error tree (EpError and below), re-exported here.
See docs/api.md for what a runtime integrator uses.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from snapshotter.erofs.format import (
        FormatError,
    )
    from snapshotter.errors import (
        AlreadyExists,
        CorruptImage,
        DigestMismatch,
        EpError,
        FailedPrecondition,
        InvalidArgument,
        InvalidInput,
        NotFound,
        PermissionDenied,
        ResourceExhausted,
        Unavailable,
        Unimplemented,
        Unsupported,
        VerityMismatch,
    )
    from snapshotter.ingest.validate import (
        InvalidLayer,
    )
    from snapshotter.manifest import (
        ManifestError,
        SignedManifest,
        check_devices,
        verify,
    )

__all__ = [
    "EpError",
    "InvalidInput",
    "InvalidArgument",
    "DigestMismatch",
    "CorruptImage",
    "VerityMismatch",
    "Unsupported",
    "Unimplemented",
    "NotFound",
    "AlreadyExists",
    "FailedPrecondition",
    "Unavailable",
    "ResourceExhausted",
    "PermissionDenied",
    "SignedManifest",
    "verify",
    "check_devices",
    "ManifestError",
    "FormatError",
    "InvalidLayer",
]

# Standard library only, unlike the other packages' `lazy_exports`: the guest image ships
# this file with a few modules of the package and nothing else.
_EXPORTS = {
    "EpError": "snapshotter.errors",
    "InvalidInput": "snapshotter.errors",
    "InvalidArgument": "snapshotter.errors",
    "DigestMismatch": "snapshotter.errors",
    "CorruptImage": "snapshotter.errors",
    "VerityMismatch": "snapshotter.errors",
    "Unsupported": "snapshotter.errors",
    "Unimplemented": "snapshotter.errors",
    "NotFound": "snapshotter.errors",
    "AlreadyExists": "snapshotter.errors",
    "FailedPrecondition": "snapshotter.errors",
    "Unavailable": "snapshotter.errors",
    "ResourceExhausted": "snapshotter.errors",
    "PermissionDenied": "snapshotter.errors",
    "SignedManifest": "snapshotter.manifest",
    "verify": "snapshotter.manifest",
    "check_devices": "snapshotter.manifest",
    "ManifestError": "snapshotter.manifest",
    "FormatError": "snapshotter.erofs.format",
    "InvalidLayer": "snapshotter.ingest.validate",
}


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
