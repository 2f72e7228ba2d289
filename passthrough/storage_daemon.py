"""qemu-storage-daemon: the vhost-user-blk backend process, one per VM, driven over its QMP."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from passthrough import procs
from passthrough.qmp import QmpSession


class StorageDaemon:
    """A qemu-storage-daemon with only a QMP monitor; exports are added at run time."""

    def __init__(self, qmp_path: Path, log: Path, own_qmp_path: Path | None = None,
                 binary: str = "qemu-storage-daemon") -> None:
        """QMP_PATH is for attach tools; OWN_QMP_PATH (if given) a second monitor for the
        launcher's own inspection (one client per monitor at a time)."""
        self.qmp_path = qmp_path
        self.own_qmp_path = own_qmp_path
        self.log = log
        self.binary = binary
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> StorageDaemon:
        argv = [shutil.which(self.binary) or self.binary,
                "--chardev", f"socket,id=qmp0,path={self.qmp_path},server=on,wait=off",
                "--monitor", "chardev=qmp0"]
        if self.own_qmp_path:
            argv += ["--chardev", f"socket,id=qmp1,path={self.own_qmp_path},server=on,wait=off",
                     "--monitor", "chardev=qmp1"]
        self.proc = procs.spawn(argv, self.log)
        for path in (self.qmp_path, self.own_qmp_path):
            if path:
                procs.wait_socket(path, self.proc, timeout, self.log)
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def session(self) -> QmpSession:
        return QmpSession(self.own_qmp_path or self.qmp_path, name="erofs-passthrough-qsd")

    def stop(self) -> None:
        procs.stop(self.proc)
