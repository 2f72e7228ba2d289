"""containerd's namespace on the wire: the `containerd-namespace` gRPC metadata header.

containerd's content store, and its view of snapshots, are per namespace. The header is what
every client sends (our content client, the test rig's Snapshots client) and what our services
read first; keys made by containerd's metadata layer (`<namespace>/<n>/<name>`) carry it too,
which is the fallback when a call comes without the header.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

__all__ = ["NAMESPACE_HEADER", "namespace_metadata", "namespace_of"]

NAMESPACE_HEADER = "containerd-namespace"


class _CallContext(Protocol):
    """What a grpc.ServicerContext offers here."""

    def invocation_metadata(self) -> Iterable[Any] | None: ...


def namespace_metadata(namespace: str) -> tuple[tuple[str, str], ...]:
    """The metadata of a call made in NAMESPACE."""
    return ((NAMESPACE_HEADER, namespace),)


def namespace_of(context: _CallContext, key: str = "") -> str:
    """The call's namespace: its header, else the first part of KEY when KEY has one (a
    key from containerd's metadata layer), else "" (none known)."""
    for name, value in context.invocation_metadata() or ():
        if name == NAMESPACE_HEADER:
            return str(value)
    return key.split("/", 1)[0] if "/" in key else ""
