"""EROFS layers, dm-verity and the containerd-facing services.

Layers, lowest first (each imports only those below it): `erofs` (the on-disk format),
`verity` (dm-verity trees; standard library only, the guest ships it), `ingest` (tar and
directory import, conversion), `fsmeta` (the merge), `service` (the containerd snapshotter and
differ). `manifest` is the signed root manifest: the snapshotter signs, the runtime reads,
the guest verifies. `errors` is the one error tree (EpError and below), re-exported here.
See docs/api.md for what a runtime integrator uses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from snapshotter.errors import (
    AlreadyExists as AlreadyExists,
)
from snapshotter.errors import (
    CorruptImage as CorruptImage,
)
from snapshotter.errors import (
    DigestMismatch as DigestMismatch,
)
from snapshotter.errors import (
    EpError as EpError,
)
from snapshotter.errors import (
    FailedPrecondition as FailedPrecondition,
)
from snapshotter.errors import (
    InvalidArgument as InvalidArgument,
)
from snapshotter.errors import (
    InvalidInput as InvalidInput,
)
from snapshotter.errors import (
    NotFound as NotFound,
)
from snapshotter.errors import (
    PermissionDenied as PermissionDenied,
)
from snapshotter.errors import (
    ResourceExhausted as ResourceExhausted,
)
from snapshotter.errors import (
    Unavailable as Unavailable,
)
from snapshotter.errors import (
    Unimplemented as Unimplemented,
)
from snapshotter.errors import (
    Unsupported as Unsupported,
)
from snapshotter.errors import (
    VerityMismatch as VerityMismatch,
)
from snapshotter.lazy_exports import lazy_exports

if TYPE_CHECKING:
    from snapshotter.erofs.format import (
        FormatError as FormatError,
    )
    from snapshotter.ingest.validate import (
        InvalidLayer as InvalidLayer,
    )
    from snapshotter.manifest import (
        ManifestError as ManifestError,
    )
    from snapshotter.manifest import (
        SignedManifest as SignedManifest,
    )
    from snapshotter.manifest import (
        check_devices as check_devices,
    )
    from snapshotter.manifest import (
        verify as verify,
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

__getattr__, __dir__ = lazy_exports(__name__, {
    "SignedManifest": "snapshotter.manifest",
    "verify": "snapshotter.manifest",
    "check_devices": "snapshotter.manifest",
    "ManifestError": "snapshotter.manifest",
    "FormatError": "snapshotter.erofs.format",
    "InvalidLayer": "snapshotter.ingest.validate",
}, globals())
