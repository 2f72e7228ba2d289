"""A private containerd with our service as its proxy snapshotter (and differ), as subprocesses:
what the demo runs, and what the tests and benchmarks build on.

- `SnapshotterProcess`: `python -m snapshotter.service.cli serve` on a private root and socket
  (extra arguments, e.g. `--config serve.toml` for VM mode and a signing key).
- `Containerd`: a private containerd (own config, root, state, sockets; CRI disabled) with our
  service as the proxy snapshotter `erofs-py` and, from 1.7 on and when asked, as the proxy
  differ `erofs-py-diff`; driven with its own `ctr`.
- `Stack`: both under one directory, started and stopped together.

Nothing here touches the machine's own containerd: every path is below the given base.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from snapshotter.errors import EpError
from snapshotter.service.namespaces import namespace_metadata

REPO = Path(__file__).resolve().parents[2]  # the checkout: `-m` runs its code, not an install
SNAPSHOTTER = "erofs-py"
DIFFER = "erofs-py-diff"


class ContainerdError(EpError):
    """containerd, ctr or our service failed; the message carries their output."""


@dataclass(frozen=True)
class Dist:
    """One containerd: its version and where its containerd, ctr and shim live."""

    version: str
    bin_dir: Path

    @property
    def major_minor(self) -> tuple[int, int]:
        major, minor = self.version.split(".")[:2]
        return int(major), int(minor)

    @property
    def has_diff_proxies(self) -> bool:
        """1.6 panics at start with a diff proxy configured; 1.7 and later take one."""
        return self.major_minor >= (1, 7)

    def tool(self, name: str) -> str:
        return str(self.bin_dir / name)


def system_dist(bin_dir: Path | None = None) -> Dist:
    """The machine's containerd (Debian bookworm's 1.6, installed by .ci/setup), or the one in
    BIN_DIR (containerd, ctr and containerd-shim-runc-v2 side by side)."""
    binary = str(bin_dir / "containerd") if bin_dir else shutil.which("containerd")
    if binary is None or not os.access(binary, os.X_OK):
        raise ContainerdError(
            f"no containerd {'in ' + str(bin_dir) if bin_dir else 'on PATH'} (run .ci/setup)"
        )
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True)
    version = out.stdout.split()[2].lstrip("v").split("~")[0]
    return Dist(version, Path(binary).parent)


def wait_for(
    predicate: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise ContainerdError(f"{what}: process exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise ContainerdError(f"{what}: not ready after {timeout} s")
        time.sleep(0.01)


class SnapshotterProcess:
    """Our service on ROOT, listening on SOCKET."""

    def __init__(self, root: Path, socket: Path, log: Path, extra: list[str] | None = None):
        self.root, self.socket, self.log, self.extra = root, socket, log, extra or []
        self.proc: subprocess.Popen | None = None

    def start(self) -> SnapshotterProcess:
        cmd = [
            sys.executable,
            "-m",
            "snapshotter.service.cli",
            "serve",
            "--root",
            str(self.root),
            "--address",
            str(self.socket),
            "--log-level",
            "debug",
            *self.extra,
        ]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=log)
        try:
            wait_for(self.healthy, 20, f"snapshotter on {self.socket}", self.proc)
        except ContainerdError as exc:
            raise ContainerdError(f"{exc}\n{_tail(self.log)}") from None
        return self

    def healthy(self) -> bool:
        if not self.socket.exists():
            return False
        with grpc.insecure_channel(f"unix:{self.socket}") as ch:
            try:
                reply = health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(), timeout=1
                )
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


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def containerd_config(dist: Dist, base: Path, snapshotter_socket: Path, differ: bool) -> str:
    v2 = dist.major_minor >= (2, 0)
    disabled = ['"io.containerd.grpc.v1.cri"']
    if v2:
        disabled += ['"io.containerd.cri.v1.images"', '"io.containerd.cri.v1.runtime"']
    lines = [
        f"version = {3 if v2 else 2}",
        f'root = "{base}/root"',
        f'state = "{base}/state"',
        f"disabled_plugins = [{', '.join(disabled)}]",
        "[grpc]",
        f'  address = "{base}/containerd.sock"',
        "[ttrpc]",
        f'  address = "{base}/containerd.sock.ttrpc"',
        '[plugins."io.containerd.internal.v1.opt"]',
        f'  path = "{base}/opt"',
        f"[proxy_plugins.{SNAPSHOTTER}]",
        '  type = "snapshot"',
        f'  address = "{snapshotter_socket}"',
    ]
    if v2:  # the transfer service (ctr images import) unpacks only what unpack_config names
        ours = DIFFER if differ else "walking"
        for snapshotter, applier in (("overlayfs", "walking"), (SNAPSHOTTER, ours)):
            lines += [
                '[[plugins."io.containerd.transfer.v1.local".unpack_config]]',
                '  platform = "linux/amd64"',
                f'  snapshotter = "{snapshotter}"',
                f'  differ = "{applier}"',
            ]
    if differ:
        lines += [
            f"[proxy_plugins.{DIFFER}]",
            '  type = "diff"',
            f'  address = "{snapshotter_socket}"',
            '[plugins."io.containerd.service.v1.diff-service"]',
            f'  default = ["{DIFFER}", "walking"]',
        ]
    return "\n".join(lines) + "\n"


class Containerd:
    """A private containerd of DIST under BASE."""

    def __init__(self, dist: Dist, base: Path, snapshotter_socket: Path, differ: bool = False):
        if differ and not dist.has_diff_proxies:
            raise ContainerdError(f"containerd {dist.version} has no diff proxies (1.7+)")
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
        try:
            wait_for(self._ready, 20, f"containerd {self.dist.version}", self.proc)
        except ContainerdError as exc:
            raise ContainerdError(f"{exc}\n{self.log_tail()}") from None
        return self

    def run_output(self, snapshotter: str, image: str, name: str, script: str) -> str:
        """What SCRIPT (busybox sh) prints in a container of IMAGE on SNAPSHOTTER, as
        `ctr run --rm` would, but read from a file the container writes into a bind mount:
        `ctr run` without a terminal sometimes exits 0 before it has copied all of a
        short-lived task's stdout, which lost a container's whole output under load."""
        out = Path(tempfile.mkdtemp(prefix=f"out-{name}-", dir=self.base))
        try:
            self.ctr(
                "run",
                "--rm",
                "--snapshotter",
                snapshotter,
                "--mount",
                f"type=bind,src={out},dst=/.ep-out,options=rbind:rw",
                image,
                name,
                "/bin/busybox",
                "sh",
                "-c",
                f"( {script} ) > /.ep-out/stdout",
            )
            return (out / "stdout").read_text()
        finally:
            shutil.rmtree(out, ignore_errors=True)

    def _ready(self) -> bool:
        return self.socket.exists() and self.ctr("version", check=False).returncode == 0

    def ctr(
        self, *args: str, namespace: str = "default", check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [self.dist.tool("ctr"), "--address", str(self.socket), "--namespace", namespace, *args],
            capture_output=True,
            text=True,
            env=self.env(),
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise ContainerdError(
                f"ctr {' '.join(args)} failed ({proc.returncode}):\n"
                f"{proc.stdout}\n{proc.stderr}\n{self.log_tail()}"
            )
        return proc

    def ingest(self, blob: Path, digest: str, namespace: str = "default") -> None:
        """Put BLOB into the content store as a GC root. Content nothing refers to is garbage
        to containerd, whose GC may run at any time (one runs shortly after start): the blob is
        labelled `containerd.io/gc.root` right after the ingest, and ingested again if a GC
        took it before the label landed."""
        base = [self.dist.tool("ctr"), "--address", str(self.socket), "-n", namespace, "content"]
        for _attempt in range(10):
            with open(blob, "rb") as f:
                subprocess.run(
                    [
                        *base,
                        "ingest",
                        "--expected-digest",
                        digest,
                        "--expected-size",
                        str(blob.stat().st_size),
                        f"ingest-{digest[7:19]}",
                    ],
                    stdin=f,
                    check=True,
                    capture_output=True,
                    env=self.env(),
                    timeout=120,
                )
            label = subprocess.run(
                [*base, "label", digest, "containerd.io/gc.root=test"],
                capture_output=True,
                text=True,
                env=self.env(),
                timeout=120,
            )
            if label.returncode == 0:
                return
        raise ContainerdError(f"containerd kept collecting {digest}: {label.stderr}")

    def log_tail(self, lines: int = 20) -> str:
        return _tail(self.base / "containerd.log", lines)

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
    """Our service plus a containerd using it, under BASE. SERVICE_ARGS go to `serve`
    (e.g. `--config serve.toml`)."""

    def __init__(
        self, dist: Dist, base: Path, differ: bool = False, service_args: list[str] | None = None
    ):
        self.base, self.differ = base, differ
        base.mkdir(parents=True, exist_ok=True)
        containerd_socket = base / "containerd" / "containerd.sock"
        self.service = SnapshotterProcess(
            base / "erofs-py",
            base / "erofs-py.sock",
            base / "erofs-py.log",
            ["--containerd-address", str(containerd_socket), *(service_args or [])],
        )
        self.containerd = Containerd(dist, base / "containerd", self.service.socket, differ)

    def start(self) -> Stack:
        self.service.start()
        try:
            self.containerd.start()
        except BaseException:
            self.stop()
            raise
        return self

    def restart_service(self) -> None:
        self.service.start()

    def stop(self) -> None:
        self.containerd.stop()
        if self.service.proc is not None and self.service.proc.poll() is None:
            self.service.stop()
        unmount_under(self.base)


class Snapshots:
    """containerd's Snapshots API on its own socket (what a runtime calls for a rootfs), with
    the namespace header containerd wants."""

    def __init__(self, socket: Path, snapshotter: str = SNAPSHOTTER, namespace: str = "default"):
        from snapshotter.service.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
        from snapshotter.service.api.containerd.services.snapshots.v1 import snapshots_pb2_grpc

        self._pb = pb
        self.snapshotter = snapshotter
        self._metadata = namespace_metadata(namespace)
        self._channel = grpc.insecure_channel(f"unix:{socket}")
        self._stub = snapshots_pb2_grpc.SnapshotsStub(self._channel)

    def prepare(self, key: str, parent: str, labels: dict[str, str] | None = None) -> list:
        """Mounts (containerd.types.Mount messages) of a new active snapshot KEY over PARENT."""
        try:
            reply = self._stub.Prepare(
                self._pb.PrepareSnapshotRequest(
                    snapshotter=self.snapshotter, key=key, parent=parent, labels=labels or {}
                ),
                metadata=self._metadata,
                timeout=120,
            )
        except grpc.RpcError as exc:
            raise ContainerdError(f"Prepare {key}: {exc.code().name}: {exc.details()}") from None
        return list(reply.mounts)

    def remove(self, key: str) -> None:
        try:
            self._stub.Remove(
                self._pb.RemoveSnapshotRequest(snapshotter=self.snapshotter, key=key),
                metadata=self._metadata,
                timeout=60,
            )
        except grpc.RpcError as exc:
            raise ContainerdError(f"Remove {key}: {exc.code().name}: {exc.details()}") from None

    def close(self) -> None:
        self._channel.close()
