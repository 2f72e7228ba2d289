"""Our exceptions -> gRPC status codes containerd maps back to its errdefs classes."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from snapshotter import errdefs
from snapshotter.errors import EpError

log = logging.getLogger(__name__)

CODES: dict[type[Exception], grpc.StatusCode] = {
    errdefs.NotFound: grpc.StatusCode.NOT_FOUND,
    errdefs.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errdefs.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errdefs.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errdefs.Unimplemented: grpc.StatusCode.UNIMPLEMENTED,
}

F = TypeVar("F", bound=Callable[..., Any])


def code_for(exc: BaseException) -> grpc.StatusCode:
    for cls, code in CODES.items():
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.UNKNOWN if isinstance(exc, EpError) else grpc.StatusCode.INTERNAL


def rpc(method: F) -> F:
    """Run a unary servicer method; an exception becomes an aborted call with its status."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except Exception as exc:
            code = code_for(exc)
            level = logging.ERROR if code == grpc.StatusCode.INTERNAL else logging.INFO
            log.log(level, "rpc failed", exc_info=code == grpc.StatusCode.INTERNAL,
                    extra={"rpc": method.__name__, "code": code.name, "error": str(exc)})
            context.abort(code, str(exc))

    return wrapper  # type: ignore[return-value]
