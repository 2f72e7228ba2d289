"""Our exceptions -> gRPC status codes containerd maps back to its errdefs classes, in one table.

containerd's errors.FromGRPC turns NotFound, AlreadyExists, FailedPrecondition, InvalidArgument,
Unavailable, Unimplemented (and, from errdefs 0.3 on, ResourceExhausted and PermissionDenied)
into the matching error class; every other code reaches the user as "...: unknown", so the
message has to say what happened on its own. An OSError becomes one line naming its errno and
the path; one without a path (a write into an open file) gets the servicer's state directory.
"""

from __future__ import annotations

import errno
import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc

from snapshotter import errors
from snapshotter.errors import EpError

log = logging.getLogger(__name__)

# First match wins: subclasses before their bases. Plain EpError: UNKNOWN; anything else is a
# bug: INTERNAL, logged with its traceback.
CODES: dict[type[Exception], grpc.StatusCode] = {
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,  # a request or layer not as claimed
    errors.Unimplemented: grpc.StatusCode.UNIMPLEMENTED,
    errors.Unsupported: grpc.StatusCode.INVALID_ARGUMENT,  # the message says what we lack
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
}
ERRNO_CODES: dict[int, grpc.StatusCode] = {
    errno.ENOSPC: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errno.EDQUOT: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errno.ENOMEM: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errno.EMFILE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errno.ENFILE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errno.EACCES: grpc.StatusCode.PERMISSION_DENIED,
    errno.EPERM: grpc.StatusCode.PERMISSION_DENIED,
    errno.EROFS: grpc.StatusCode.PERMISSION_DENIED,
}

F = TypeVar("F", bound=Callable[..., Any])


def code_for(exc: BaseException) -> grpc.StatusCode:
    for cls, code in CODES.items():
        if isinstance(exc, cls):
            return code
    if isinstance(exc, OSError) and exc.errno in ERRNO_CODES:
        return ERRNO_CODES[exc.errno]
    return grpc.StatusCode.UNKNOWN if isinstance(exc, EpError) else grpc.StatusCode.INTERNAL


def describe_os_error(exc: OSError, where: Path | str | None = None) -> str:
    """`No space left on device (ENOSPC): /var/lib/.../layer.erofs`: what, errno, path."""
    what = exc.strerror or str(exc)
    name = errno.errorcode.get(exc.errno or 0)
    if name:
        what = f"{what} ({name})"
    path = exc.filename if exc.filename is not None else where
    if path is None:
        return what
    if exc.filename2 is not None:
        return f"{what}: {exc.filename} -> {exc.filename2}"
    return f"{what}: {path}" if exc.filename is not None else f"{what} under {path}"


def message_for(exc: BaseException, where: Path | str | None = None) -> str:
    if isinstance(exc, OSError) and not isinstance(exc, EpError):
        return describe_os_error(exc, where)
    return str(exc) or type(exc).__name__


def _state_dir(servicer: Any) -> Path | None:
    """Where a servicer writes: its Snapshotter's root (servicers keep it as `sn`)."""
    return getattr(getattr(servicer, "sn", None), "root", None)


def rpc(method: F) -> F:
    """Run a unary servicer method; an exception becomes an aborted call with its status."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except Exception as exc:
            code = code_for(exc)
            message = message_for(exc, _state_dir(self))
            bug = code == grpc.StatusCode.INTERNAL  # a traceback only where nothing is known
            level = (
                logging.ERROR
                if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.RESOURCE_EXHAUSTED)
                else logging.INFO
            )
            log.log(
                level,
                "rpc failed",
                exc_info=bug,
                extra={"rpc": method.__name__, "code": code.name, "error": message},
            )
            context.abort(code, message)

    return wrapper  # type: ignore[return-value]
