"""The project's error tree: every error a user can act on is an `EpError`.

The CLI prints these as one line on stderr and exits non-zero; the containerd services map them
to gRPC codes in one table (`snapshotter.service.grpc_errors`); anything that is not an
`EpError` is a bug and keeps its traceback. Catch the most precise class that says what you
can do about it:

    EpError
    ├── InvalidInput            input that is not what it claims, or over a ceiling
    │   ├── InvalidArgument     the request itself is wrong (containerd's InvalidArgument)
    │   ├── DigestMismatch      content whose digest is not the one it was named by
    │   └── CorruptImage        a damaged EROFS image, verity tree or superblock
    │       ├── FormatError     (snapshotter.erofs.format) a structure that does not parse
    │       ├── InvalidLayer    (snapshotter.ingest.validate) a native layer fsck would refuse
    │       └── VerityMismatch  data that does not hash to its tree or root
    ├── Unsupported             well-formed, but not something we do (compression, algorithm)
    │   └── Unimplemented       not ours to do: containerd falls back to another implementation
    ├── NotFound                the snapshot, parent, content or device does not exist
    ├── AlreadyExists           something with that key or name exists already
    ├── FailedPrecondition      the object is in the wrong state for the call
    ├── Unavailable             a service we depend on does not answer
    ├── ResourceExhausted       out of space, quota, memory or descriptors
    ├── PermissionDenied        the operating system refused access to a file
    └── (passthrough.errors)    PassthroughError: QMP, attach, the VM and the guest agent,
                                with Refused for a guest's refusal carried from agent to shim

The containerd-facing names (NotFound ... PermissionDenied) are containerd's errdefs classes.
"""

from __future__ import annotations

__all__ = [
    "AlreadyExists",
    "CorruptImage",
    "DigestMismatch",
    "EpError",
    "FailedPrecondition",
    "InvalidArgument",
    "InvalidInput",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "Unavailable",
    "Unimplemented",
    "Unsupported",
    "VerityMismatch",
]


class EpError(Exception):
    """An error a user can act on: bad input, a refused operation, a failed dependency."""


class InvalidInput(EpError):
    """Input that is not what it claims or exceeds a ceiling: a malformed or hostile tar, a
    corrupt compressed stream, a damaged EROFS image. containerd sees InvalidArgument."""


class InvalidArgument(InvalidInput):
    """The request itself is wrong (empty key, parent not committed, unknown field, bad flag)."""


class DigestMismatch(InvalidInput):
    """Content whose digest is not the one it was named by (a diffID, a blob, a manifest)."""


class CorruptImage(InvalidInput):
    """A damaged EROFS image, dm-verity tree or verity superblock."""


class VerityMismatch(CorruptImage):
    """Data that does not hash to its dm-verity tree, or a tree whose root is not the one
    expected: a tampered or corrupted block."""


class Unsupported(EpError):
    """Well-formed input we do not handle (a compressed EROFS, an unknown hash algorithm)."""


class Unimplemented(Unsupported):
    """Not ours to do: containerd falls back to another implementation."""


class NotFound(EpError):
    """The snapshot (or its parent, or the content, or the device) does not exist."""


class AlreadyExists(EpError):
    """A snapshot (or file, or key) with that name exists already."""


class FailedPrecondition(EpError):
    """The object is in the wrong state for the call (not active, has children, busy)."""


class Unavailable(EpError):
    """A service we depend on does not answer (containerd's content store, a registry)."""


class ResourceExhausted(EpError):
    """Out of space, quota, memory or descriptors; retrying after freeing some may work."""


class PermissionDenied(EpError):
    """The operating system refused the service access to a file."""
