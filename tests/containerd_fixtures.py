"""Real containerd daemons and our service as subprocesses, for the tests and benchmarks.

`SnapshotterProcess` runs `python -m snapshotter.service_cli serve` on a private root and socket.
`Containerd` runs a private containerd (own config, root, state, sockets; CRI disabled) with our
service configured as the proxy snapshotter `erofs-py` (and, from 1.7 on, as the proxy differ
`erofs-py-diff` when asked), and drives it with its own `ctr`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.containerd_dist import Dist

REPO = Path(__file__).resolve().parent.parent


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not ready after {timeout} s")
        time.sleep(0.01)


class SnapshotterProcess:
    """Our service on ROOT, listening on SOCKET."""

    def __init__(self, root: Path, socket: Path, log: Path, extra: list[str] | None = None):
        self.root, self.socket, self.log, self.extra = root, socket, log, extra or []
        self.proc: subprocess.Popen | None = None

    def start(self) -> SnapshotterProcess:
        cmd = [sys.executable, "-m", "snapshotter.service_cli", "serve", "--root", str(self.root),
               "--address", str(self.socket), "--log-level", "debug", *self.extra]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=log)
        wait_for(self.healthy, 20, f"snapshotter on {self.socket}", self.proc)
        return self

    def healthy(self) -> bool:
        if not self.socket.exists():
            return False
        with grpc.insecure_channel(f"unix:{self.socket}") as ch:
            try:
                reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                            timeout=1)
            except grpc.RpcError:
                return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def kill(self) -> None:
        """SIGKILL: what a crash looks like."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.terminate()
        return self.proc.wait(timeout=20)


def containerd_config(dist: Dist, base: Path, snapshotter_socket: Path, differ: bool) -> str:
    v2 = dist.major_minor >= (2, 0)
    disabled = ['"io.containerd.grpc.v1.cri"']
    if v2:
        disabled += ['"io.containerd.cri.v1.images"', '"io.containerd.cri.v1.runtime"']
    lines = [
        f"version = {3 if v2 else 2}",
        f'root = "{base}/root"', f'state = "{base}/state"',
        f"disabled_plugins = [{', '.join(disabled)}]",
        "[grpc]", f'  address = "{base}/containerd.sock"',
        "[ttrpc]", f'  address = "{base}/containerd.sock.ttrpc"',
        '[plugins."io.containerd.internal.v1.opt"]', f'  path = "{base}/opt"',
        "[proxy_plugins.erofs-py]", '  type = "snapshot"', f'  address = "{snapshotter_socket}"',
    ]
    if v2:  # the transfer service (ctr images import) unpacks only what unpack_config names
        ours = "erofs-py-diff" if differ else "walking"
        for snapshotter, applier in (("overlayfs", "walking"), ("erofs-py", ours)):
            lines += ['[[plugins."io.containerd.transfer.v1.local".unpack_config]]',
                      '  platform = "linux/amd64"', f'  snapshotter = "{snapshotter}"',
                      f'  differ = "{applier}"']
    if differ:
        lines += ["[proxy_plugins.erofs-py-diff]", '  type = "diff"',
                  f'  address = "{snapshotter_socket}"',
                  '[plugins."io.containerd.service.v1.diff-service"]',
                  '  default = ["erofs-py-diff", "walking"]']
    return "\n".join(lines) + "\n"


class Containerd:
    """A private containerd of DIST under BASE."""

    def __init__(self, dist: Dist, base: Path, snapshotter_socket: Path, differ: bool = False):
        self.dist, self.base = dist, base
        self.socket = base / "containerd.sock"
        base.mkdir(parents=True, exist_ok=True)
        self.config = base / "config.toml"
        self.config.write_text(containerd_config(dist, base, snapshotter_socket, differ))
        self.proc: subprocess.Popen | None = None

    def env(self) -> dict[str, str]:
        # containerd finds containerd-shim-runc-v2 on PATH: its own version first.
        return {**os.environ, "PATH": f"{self.dist.bin_dir}:{os.environ.get('PATH', '')}"}

    def start(self) -> Containerd:
        with open(self.base / "containerd.log", "ab") as log:
            cmd = [self.dist.tool("containerd"), "--config", str(self.config)]
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=self.env())
        wait_for(self._ready, 20, f"containerd {self.dist.version}", self.proc)
        return self

    def _ready(self) -> bool:
        return self.socket.exists() and self.ctr("version", check=False).returncode == 0

    def ctr(self, *args: str, namespace: str = "default", check: bool = True,
            timeout: float = 120) -> subprocess.CompletedProcess:
        proc = subprocess.run([self.dist.tool("ctr"), "--address", str(self.socket),
                               "--namespace", namespace, *args],
                              capture_output=True, text=True, env=self.env(), timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"ctr {' '.join(args)} failed ({proc.returncode}):\n"
                                 f"{proc.stdout}\n{proc.stderr}\n{self.log_tail()}")
        return proc

    def log_tail(self, lines: int = 20) -> str:
        log = self.base / "containerd.log"
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def unmount_under(base: Path) -> None:
    """Lazily unmount everything mounted below BASE (deepest first): our layers, overlays."""
    prefix = str(base.resolve()) + "/"
    targets = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        target = line.split()[4].encode().decode("unicode_escape")
        if target.startswith(prefix):
            targets.append(target)
    for target in sorted(targets, key=len, reverse=True):
        subprocess.run(["umount", "-l", target], check=False, capture_output=True)


class Stack:
    """Our service plus a containerd using it, under BASE (what a test module shares)."""

    def __init__(self, dist: Dist, base: Path, differ: bool = False):
        self.base, self.differ = base, differ
        base.mkdir(parents=True, exist_ok=True)
        containerd_socket = base / "containerd" / "containerd.sock"
        self.service = SnapshotterProcess(base / "erofs-py", base / "erofs-py.sock",
                                          base / "erofs-py.log",
                                          ["--containerd-address", str(containerd_socket)])
        self.containerd = Containerd(dist, base / "containerd", self.service.socket, differ)

    def start(self) -> Stack:
        self.service.start()
        self.containerd.start()
        return self

    def restart_service(self) -> None:
        self.service.start()

    def stop(self) -> None:
        self.containerd.stop()
        if self.service.proc is not None and self.service.proc.poll() is None:
            self.service.stop()
        unmount_under(self.base)
