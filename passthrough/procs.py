"""Starting and stopping the helper processes (QEMU, qemu-storage-daemon) we own."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

from passthrough.errors import VmFailure


def spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    """Start ARGV with stdout/stderr into LOG, in its own session (so ^C in a test run does not
    hit it before we stop it in order)."""
    with open(log, "ab") as fh:
        try:
            return subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=fh, stderr=fh, start_new_session=True
            )
        except FileNotFoundError:
            raise VmFailure(f"{argv[0]} is not installed (run .ci/setup)") from None


def program_name(proc: subprocess.Popen[bytes]) -> str:
    """The name of the program PROC runs (`spawn` gives it a list, Popen allows more)."""
    args = proc.args
    first = args if isinstance(args, str | bytes | os.PathLike) else args[0]
    return Path(os.fsdecode(first)).name


def wait_socket(
    path: Path, proc: subprocess.Popen[bytes], timeout: float, log: Path, qmp_greeting: bool = False
) -> None:
    """Wait until PROC listens on unix socket PATH; VmFailure (with LOG's tail) if it exits.

    QMP_GREETING: wait until the monitor there has sent its greeting. qemu-storage-daemon 7.2
    segfaults now and then (measured: 3 of 500 starts under load, 0 of 500 when waiting for
    the greeting) when a client connects and hangs up before its monitor is set up."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise VmFailure(f"{program_name(proc)} exited with {proc.returncode}: {tail(log)}")
        if path.exists():
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                try:
                    s.connect(str(path))
                    if not qmp_greeting or _read_greeting(s, deadline):
                        return
                except OSError:
                    pass
        if time.monotonic() > deadline:
            raise VmFailure(f"{program_name(proc)} did not open {path} in {timeout}s")
        time.sleep(0.005)


def _read_greeting(sock: socket.socket, deadline: float) -> bool:
    data = b""
    while b"\n" not in data:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        chunk = sock.recv(4096)
        if not chunk:
            return False
        data += chunk
    return b'"QMP"' in data


def stop(proc: subprocess.Popen[bytes] | None, grace: float = 3.0) -> None:
    """SIGTERM, then SIGKILL after GRACE seconds; always reaps."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def start_time(pid: int) -> int | None:
    """PID's start time (clock ticks since boot, /proc/PID/stat field 22), or None if no such
    process: with the pid it names one process for good, as a pid alone does not (pids are
    reused)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may itself hold spaces or ")"
    return int(stat[stat.rindex(b")") + 2 :].split()[19])


def is_running(pid: int, started: int) -> bool:
    """Is the process PID that started at STARTED (see start_time) still there (not a zombie)?"""
    if pid <= 0 or start_time(pid) != started:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rsplit(b")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in (b"Z", b"X")


def peer_pid(sock: socket.socket) -> int:
    """The pid of the process at the other end of unix socket SOCK (SO_PEERCRED; 0 if the peer
    is in a pid namespace we cannot see into)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, _uid, _gid = struct.unpack("3i", creds)
    return pid


def terminate(pid: int, started: int, grace: float = 3.0) -> None:
    """Stop the process (PID, STARTED) that is not our child: SIGTERM, SIGKILL after GRACE
    seconds, and wait until it is gone. A pidfd pins the process, so a reused pid is never
    signalled."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        if not is_running(pid, started):
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, sig)
            if select.select([pidfd], [], [], wait)[0]:
                # readable: it exited; a zombie of someone else's is gone for us too
                return
        raise VmFailure(f"process {pid} did not exit after SIGKILL")
    finally:
        os.close(pidfd)
