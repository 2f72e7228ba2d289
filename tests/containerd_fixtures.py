"""Real containerd daemons and our service as subprocesses, for the tests and benchmarks: the
code lives in shim_integration.containerd_private (the demo runs it too)."""

from shim_integration.containerd_private import (
    Containerd,
    SnapshotterProcess,
    Stack,
    containerd_config,
    unmount_under,
    wait_for,
)

__all__ = ["Containerd", "SnapshotterProcess", "Stack", "containerd_config", "unmount_under",
           "wait_for"]
