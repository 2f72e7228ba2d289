"""Starting and stopping the helper processes (QEMU, qemu-storage-daemon) we own."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from passthrough.errors import VmFailure


def spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    """Start ARGV with stdout/stderr into LOG, in its own session (so ^C in a test run does not
    hit it before we stop it in order)."""
    with open(log, "ab") as fh:
        try:
            return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fh, stderr=fh,
                                    start_new_session=True)
        except FileNotFoundError:
            raise VmFailure(f"{argv[0]} is not installed (run .ci/setup)") from None


def wait_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float, log: Path) -> None:
    """Wait until PROC listens on unix socket PATH; VmFailure (with LOG's tail) if it exits."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise VmFailure(f"{Path(proc.args[0]).name} exited with {proc.returncode}: "
                            f"{tail(log)}")
        if path.exists():
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                try:
                    s.connect(str(path))
                    return
                except OSError:
                    pass
        if time.monotonic() > deadline:
            raise VmFailure(f"{Path(proc.args[0]).name} did not open {path} in {timeout}s")
        time.sleep(0.005)


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
