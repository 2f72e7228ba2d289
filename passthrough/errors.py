"""Errors of the passthrough layer; all are `EpError`s, so the CLI prints them as one line."""

from __future__ import annotations

from snapshotter.errors import EpError


class PassthroughError(EpError):
    """Attach, detach or the VM failed in a way the caller can act on."""


class QmpGone(PassthroughError):
    """The QMP peer (QEMU or qemu-storage-daemon) is not there or went away mid-operation."""


class QmpCommandError(PassthroughError):
    """A QMP command was refused; `error_class` is QMP's class (e.g. GenericError)."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"{command}: {desc} ({error_class})")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class QmpTimeout(PassthroughError):
    """A QMP reply or event did not come in time."""


class PoolExhausted(PassthroughError):
    """No free pcie-root-port is left for another hotplugged device."""


class NotAttached(PassthroughError):
    """Detach of a device that is not attached."""


class AgentFailure(PassthroughError):
    """The guest agent refused a request or cannot be reached; `errno` is the guest's errno."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class Refused(AgentFailure):
    """The guest declined on policy (a signature, a root hash, lockdown) and did nothing;
    `reason` is the guest's. Carried by the reply's `refused` field (agent_protocol)."""

    def __init__(self, message: str, reason: str, errno: int | None = None) -> None:
        super().__init__(message, errno)
        self.reason = reason


class VmFailure(PassthroughError):
    """QEMU did not start, or the guest did not come up; the message carries the console tail."""


class StorageDaemonFailure(PassthroughError):
    """The qemu-storage-daemon attach started for a VM did not come up or cannot be used."""


class GuestRamNotShared(PassthroughError):
    """vhost-user-blk on a QEMU whose guest RAM a storage daemon cannot map (not share=on)."""
