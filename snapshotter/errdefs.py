"""containerd's error classes (github.com/containerd/errdefs) as exceptions.

The snapshots and diff services turn each into the gRPC status code containerd maps back to the
same class on its side (errdefs.FromGRPC), so `errdefs.IsNotFound` etc. work for containerd.
"""

from __future__ import annotations

from snapshotter.errors import EpError


class NotFound(EpError):
    """The snapshot (or its parent, or the content) does not exist."""


class AlreadyExists(EpError):
    """A snapshot with that key or name exists already."""


class FailedPrecondition(EpError):
    """The snapshot is in the wrong state for the call (not active, has children)."""


class InvalidArgument(EpError):
    """The request itself is wrong (empty key, parent not committed, unknown field)."""


class Unimplemented(EpError):
    """Not ours to do: containerd falls back to another implementation."""


class Unavailable(EpError):
    """A service we depend on does not answer (containerd's content store)."""


class ResourceExhausted(EpError):
    """Out of space, quota, memory or descriptors; retrying after freeing some may work."""


class PermissionDenied(EpError):
    """The operating system refused the service access to a file."""
