"""qemu-storage-daemon: the vhost-user-blk backend process, one per VM, driven over its QMP.

Two kinds:
- `StorageDaemon`: the one our VM launcher (passthrough/vm.py) starts beside its QEMU.
- `VmDaemon`: the one `attach` starts for a QEMU somebody else started (a Kata VM, a plain
  `qemu-system-x86_64`), in a runtime directory of its own keyed by the VM's QMP socket:

      <run dir>/qsd/<first 32 hex digits of sha256(realpath of the QMP socket)>/
          lock             flock'd by every attach/detach of this VM (serialises them)
          supervisor.lock  flock'd by the live supervisor for its lifetime; holds "pid start"
          daemon.json      the supervisor's, the daemon's and QEMU's pid and start time,
                           written (temp name, fsync, rename) once the daemon answers
          qsd.sock         the daemon's QMP socket; qsd.log its output
          ID.vhost.sock    one vhost-user-blk export socket per attached file

  The daemon runs under a small supervisor (`python -m passthrough.storage_daemon`) that waits
  on a pidfd of QEMU: when QEMU exits, the supervisor stops the daemon and removes the
  directory, so the daemon never outlives its VM even if no attach or detach comes again. The
  daemon dies with its supervisor (PR_SET_PDEATHSIG). The digest is cut to 32 hex digits
  because a unix socket path holds at most 107 bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import hashlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from passthrough import procs
from passthrough.errors import StorageDaemonFailure
from passthrough.qmp import QmpSession

RUN_DIR_ENV = "EROFS_PASSTHROUGH_RUN_DIR"
KEY_HEX_DIGITS = 32
START_TIMEOUT = 10.0
_PR_SET_PDEATHSIG = 1


class StorageDaemon:
    """A qemu-storage-daemon with only a QMP monitor; exports are added at run time."""

    def __init__(
        self,
        qmp_path: Path,
        log: Path,
        own_qmp_path: Path | None = None,
        binary: str = "qemu-storage-daemon",
    ) -> None:
        """QMP_PATH is for attach tools; OWN_QMP_PATH (if given) a second monitor for the
        launcher's own inspection (one client per monitor at a time)."""
        self.qmp_path = qmp_path
        self.own_qmp_path = own_qmp_path
        self.log = log
        self.binary = binary
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> StorageDaemon:
        argv = [
            shutil.which(self.binary) or self.binary,
            "--chardev",
            f"socket,id=qmp0,path={self.qmp_path},server=on,wait=off",
            "--monitor",
            "chardev=qmp0",
        ]
        if self.own_qmp_path:
            argv += [
                "--chardev",
                f"socket,id=qmp1,path={self.own_qmp_path},server=on,wait=off",
                "--monitor",
                "chardev=qmp1",
            ]
        self.proc = procs.spawn(argv, self.log)
        for path in (self.qmp_path, self.own_qmp_path):
            if path:
                procs.wait_socket(path, self.proc, timeout, self.log, qmp_greeting=True)
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def session(self) -> QmpSession:
        return QmpSession(self.own_qmp_path or self.qmp_path, name="erofs-passthrough-qsd")

    def stop(self) -> None:
        procs.stop(self.proc)


def default_run_dir() -> Path:
    """$EROFS_PASSTHROUGH_RUN_DIR, else /run/erofs-passthrough for root, else the user's
    runtime directory."""
    if env := os.environ.get(RUN_DIR_ENV):
        return Path(env)
    if os.geteuid() == 0:
        return Path("/run/erofs-passthrough")
    if xdg := os.environ.get("XDG_RUNTIME_DIR"):
        return Path(xdg) / "erofs-passthrough"
    return Path(tempfile.gettempdir()) / f"erofs-passthrough-{os.getuid()}"


@dataclass(frozen=True)
class DaemonState:
    """daemon.json: who runs for whom. Pids go with start times: a pid alone can be reused."""

    vm_qmp: str
    vm_pid: int
    vm_start: int
    supervisor_pid: int
    supervisor_start: int
    qsd_pid: int
    qsd_start: int


@contextlib.contextmanager
def _flocked(directory: Path, lock: Path, blocking: bool = True) -> Iterator[bool]:
    """Hold an exclusive flock on LOCK (creating DIRECTORY); yields False if not BLOCKING and
    somebody else holds it. The lock file is removed with its directory by whoever holds it,
    so after each wait the path is checked to still be the file we locked."""
    while True:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                same = os.stat(lock).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                yield True
                return
        finally:
            os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.rename(tmp, path)
    dirfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


class VmDaemon:
    """The storage daemon attach runs for the VM behind one QMP socket (see the module doc).

    Methods other than `locked` expect the caller to hold `locked()`."""

    def __init__(
        self, vm_qmp_path: str | os.PathLike[str], run_dir: str | os.PathLike[str] | None = None
    ) -> None:
        self.vm_qmp = os.path.realpath(vm_qmp_path)
        self.root = Path(run_dir or default_run_dir()) / "qsd"
        key = hashlib.sha256(self.vm_qmp.encode()).hexdigest()[:KEY_HEX_DIGITS]
        self.dir = self.root / key
        self.lock_path = self.dir / "lock"
        self.supervisor_lock = self.dir / "supervisor.lock"
        self.state_path = self.dir / "daemon.json"
        self.qmp_path = self.dir / "qsd.sock"
        self.log = self.dir / "qsd.log"

    def locked(self) -> contextlib.AbstractContextManager[bool]:
        return _flocked(self.dir, self.lock_path)

    def state(self) -> DaemonState | None:
        try:
            return DaemonState(**json.loads(self.state_path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def running(self) -> DaemonState | None:
        """The state of a daemon that is up (supervisor and daemon both alive), else None."""
        st = self.state()
        if (
            st is not None
            and procs.is_running(st.supervisor_pid, st.supervisor_start)
            and procs.is_running(st.qsd_pid, st.qsd_start)
            and self.qmp_path.is_socket()
        ):
            return st
        return None

    def _live_supervisor(self) -> tuple[int, int] | None:
        """(pid, start) of the live supervisor, also one that has not written daemon.json
        yet (started by an attach that was killed meanwhile)."""
        if not self.supervisor_lock.exists():
            return None
        deadline = time.monotonic() + 1.0
        while True:
            with _flocked(self.dir, self.supervisor_lock, blocking=False) as free:
                if free:
                    return None
            try:
                pid, start = (int(x) for x in self.supervisor_lock.read_text().split())
                return (pid, start) if procs.is_running(pid, start) else None
            except (OSError, ValueError):  # locked, pid not written yet (a few µs)
                if time.monotonic() > deadline:
                    return None
                time.sleep(0.005)

    def ensure(self, vm_pid: int, timeout: float = START_TIMEOUT) -> DaemonState:
        """The running daemon for the VM (pid VM_PID), reused if one is up (also one a killed
        attach left starting), else started."""
        vm_start = procs.start_time(vm_pid)
        if vm_start is None:
            raise StorageDaemonFailure(f"QEMU (pid {vm_pid}) behind {self.vm_qmp} is gone")
        if self._live_supervisor() is not None:
            self._wait_ready(None, timeout)
        st = self.running()
        if st is not None and (st.vm_pid, st.vm_start) == (vm_pid, vm_start):
            return st
        self.stop()  # nothing, a dead one's remains, or one for an earlier VM on this socket
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        proc = procs.spawn(
            [
                sys.executable,
                "-m",
                "passthrough.storage_daemon",
                "--dir",
                str(self.dir),
                "--vm-qmp",
                self.vm_qmp,
                "--vm-pid",
                str(vm_pid),
                "--vm-start",
                str(vm_start),
            ],
            self.log,
        )
        return self._wait_ready(proc, timeout)

    def _wait_ready(self, proc: subprocess.Popen[bytes] | None, timeout: float) -> DaemonState:
        deadline = time.monotonic() + timeout
        while True:
            st = self.running()
            if st is not None:
                return st
            written = self.state()
            if (proc is not None and proc.poll() is not None) or (
                written is not None and not procs.is_running(written.qsd_pid, written.qsd_start)
            ):
                raise StorageDaemonFailure(
                    f"qemu-storage-daemon for {self.vm_qmp} did not "
                    f"start: {procs.tail(self.log, 5)}"
                )
            if proc is None and self._live_supervisor() is None:
                return self.running()  # type: ignore[return-value]  # None: caller restarts
            if time.monotonic() > deadline:
                raise StorageDaemonFailure(
                    f"qemu-storage-daemon for {self.vm_qmp} did not "
                    f"answer within {timeout}s: {procs.tail(self.log, 5)}"
                )
            time.sleep(0.01)

    def session(self) -> QmpSession:
        return QmpSession(self.qmp_path, name="erofs-passthrough-qsd")

    def stop(self) -> None:
        """Stop the daemon and its supervisor (if any) and remove their files, but not the
        lock the caller holds (see `remove`)."""
        st = self.state()
        starting = self._live_supervisor()
        if starting is not None:
            procs.terminate(*starting)
        if st is not None:
            procs.terminate(st.supervisor_pid, st.supervisor_start)
            procs.terminate(st.qsd_pid, st.qsd_start)
        remove_runtime_dir(self.dir, keep_lock=True)

    def remove(self) -> None:
        """Remove the runtime directory with its lock: the caller's last step under it."""
        remove_runtime_dir(self.dir)


def remove_runtime_dir(directory: Path, keep_lock: bool = False) -> None:
    """Remove a daemon's runtime directory; its lock file last (lockers recheck the path, so
    whoever waited on the removed one locks a fresh file). KEEP_LOCK: only the other files,
    for a lock holder that goes on working in the directory."""
    with contextlib.suppress(FileNotFoundError):
        for entry in directory.iterdir():
            if entry.name != "lock":
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
    if keep_lock:
        return
    with contextlib.suppress(FileNotFoundError):
        (directory / "lock").unlink()
    with contextlib.suppress(FileNotFoundError, OSError):
        directory.rmdir()


def reap_orphans(run_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Stop the daemons whose VM is gone and whose supervisor could not clean up (it was
    killed); skips directories somebody is working in. Returns the directories removed."""
    root = Path(run_dir or default_run_dir()) / "qsd"
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for directory in sorted(root.iterdir()):
            lock = directory / "lock"
            if not directory.is_dir():
                continue
            with _flocked(directory, lock, blocking=False) as mine:
                if not mine:
                    continue
                try:
                    st = DaemonState(**json.loads((directory / "daemon.json").read_text()))
                except (OSError, ValueError, TypeError):
                    with _flocked(directory, directory / "supervisor.lock", blocking=False) as idle:
                        pass
                    if idle:  # no attach, no daemon: remains of an attach that was killed
                        remove_runtime_dir(directory)
                        removed.append(directory)
                    continue
                if procs.is_running(st.vm_pid, st.vm_start):
                    continue
                procs.terminate(st.supervisor_pid, st.supervisor_start)
                procs.terminate(st.qsd_pid, st.qsd_start)
                remove_runtime_dir(directory)
                removed.append(directory)
    return removed


# --- the supervisor (a process of its own: python -m passthrough.storage_daemon) ---------------


def _die_with_parent() -> None:
    """In the daemon's child before exec: SIGKILL it when its supervisor dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        os._exit(127)


def _supervise(directory: Path, vm_qmp: str, vm_pid: int, vm_start: int) -> int:
    daemon = VmDaemon(vm_qmp, directory.parent.parent)
    if daemon.dir != directory:
        print(f"supervisor: {directory} is not the runtime directory of {vm_qmp}", flush=True)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGHUP, lambda *_: sys.exit(0))
    try:
        vm_fd = os.pidfd_open(vm_pid)
    except ProcessLookupError:
        vm_fd = -1
    if vm_fd < 0 or procs.start_time(vm_pid) != vm_start:
        print(f"supervisor: QEMU pid {vm_pid} is gone", flush=True)
        return 1
    with _flocked(directory, daemon.supervisor_lock, blocking=False) as mine:
        if not mine:
            print("supervisor: another supervisor runs for this VM", flush=True)
            return 1
        me = (os.getpid(), procs.start_time(os.getpid()) or 0)
        # one write of fixed size, no truncation: a reader sees nothing yet or all of it
        fd = os.open(daemon.supervisor_lock, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.pwrite(fd, f"{me[0]} {me[1]}".ljust(40).encode() + b"\n", 0)
        finally:
            os.close(fd)
        binary = shutil.which("qemu-storage-daemon") or "qemu-storage-daemon"
        with open(daemon.log, "ab") as log:
            qsd = subprocess.Popen(
                [
                    binary,
                    "--chardev",
                    f"socket,id=qmp0,path={daemon.qmp_path},server=on,wait=off",
                    "--monitor",
                    "chardev=qmp0",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                preexec_fn=_die_with_parent,
            )  # the supervisor is single-threaded
        try:
            procs.wait_socket(daemon.qmp_path, qsd, START_TIMEOUT, daemon.log, qmp_greeting=True)
            state = DaemonState(
                vm_qmp, vm_pid, vm_start, me[0], me[1], qsd.pid, procs.start_time(qsd.pid) or 0
            )
            _write_atomic(daemon.state_path, json.dumps(asdict(state)) + "\n")
            qsd_fd = os.pidfd_open(qsd.pid)
            select.select([vm_fd, qsd_fd], [], [])
            # QEMU or the daemon is gone: nothing can use this daemon any more.
            if select.select([vm_fd], [], [], 0)[0]:
                print(f"supervisor: QEMU (pid {vm_pid}) exited; stopping", flush=True)
            else:
                qsd.wait()
                print(f"supervisor: qemu-storage-daemon exited with {qsd.returncode}", flush=True)
            procs.stop(qsd)
            with daemon.locked():
                current = daemon.state()
                if current is not None and current.supervisor_pid == me[0]:
                    remove_runtime_dir(directory)
        finally:
            procs.stop(qsd)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m passthrough.storage_daemon",
        description="Run a qemu-storage-daemon for one QEMU until that QEMU exits "
        "(started by `erofs-passthrough attach`).",
    )
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--vm-qmp", required=True)
    parser.add_argument("--vm-pid", type=int, required=True)
    parser.add_argument("--vm-start", type=int, required=True)
    args = parser.parse_args(argv)
    return _supervise(args.dir, args.vm_qmp, args.vm_pid, args.vm_start)


if __name__ == "__main__":
    sys.exit(main())
