"""The gRPC server containerd talks to: Snapshots, Diff and health checking.

One server per root and per socket: the server takes an exclusive lock on `<root>/serve.lock`
before it touches anything under the root (a second server on the root exits with one line),
and refuses an address where another server answers (a socket file nobody listens on is a
crashed server's and is replaced). On exit it unlinks the socket only if it is still the one it
bound. The socket is created with mode 0600 (containerd runs as root).

SIGTERM/SIGINT stop the server gracefully (in-flight calls get `grace_seconds`), then the
metadata database is closed. The kernel may deliver the signal to any thread (gRPC's too), so
the main thread waits on the signal wakeup fd, never on an untimed lock. With $NOTIFY_SOCKET
set (systemd `Type=notify`) the server sends READY=1 once it listens and STOPPING=1 on stop.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import select
import signal
import socket
import stat
import threading
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from snapshotter.errors import AlreadyExists, EpError
from snapshotter.service.api.containerd.services.diff.v1 import diff_pb2_grpc
from snapshotter.service.api.containerd.services.snapshots.v1 import snapshots_pb2_grpc
from snapshotter.service.content_client import ContentClient
from snapshotter.service.diff_service import DiffService
from snapshotter.service.serve_config import ServeConfig
from snapshotter.service.snapshots import Snapshotter
from snapshotter.service.snapshots_service import SnapshotsService
from snapshotter.service.workers import WorkerPool

log = logging.getLogger(__name__)
SERVICE_NAMES = ("containerd.services.snapshots.v1.Snapshots", "containerd.services.diff.v1.Diff")


LOCK_NAME = "serve.lock"
WAKE_INTERVAL = 1.0  # the main thread also looks for a stop request this often


def _lock_root(root: Path) -> int:
    """An open descriptor holding an exclusive flock on ROOT/serve.lock; EpError if another
    process holds it (the lock goes with the process, however it ends)."""
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = root / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise AlreadyExists(f"{root} is already served by {holder} (lock {path})") from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
    return fd


def _refuse_live_socket(address: Path) -> None:
    """EpError if ADDRESS is a socket another server answers on, or not a socket at all;
    a socket file nobody listens on (a crashed server's) is removed."""
    try:
        st = address.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise AlreadyExists(f"{address} exists and is not a socket: refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2)
    try:
        probe.connect(str(address))
    except (ConnectionRefusedError, FileNotFoundError):
        address.unlink(missing_ok=True)  # stale
        return
    except OSError as exc:
        raise EpError(f"cannot check whether a server listens on {address}: {exc}") from None
    finally:
        probe.close()
    raise AlreadyExists(f"another server is listening on {address}")


def _listen(server: grpc.Server, address: Path) -> tuple[int, int]:
    """Bind ADDRESS (mode 0600); the (device, inode) of the socket file, to know it later.

    gRPC unlinks the path it bound when it shuts down (and before it binds), by name: it binds
    a private name that is then renamed to ADDRESS, so its unlink never hits a successor's
    socket at ADDRESS.
    """
    address.parent.mkdir(parents=True, exist_ok=True)
    private = address.with_name(f".{os.getpid()}.tmp")
    old = os.umask(0o177)
    try:
        if server.add_insecure_port(f"unix:{private}") == 0:
            raise EpError(f"cannot listen on {address}")
    finally:
        os.umask(old)
    st = private.lstat()
    os.rename(private, address)
    return st.st_dev, st.st_ino


def _unlink_if_ours(address: Path, ours: tuple[int, int] | None) -> None:
    """Remove ADDRESS only if it is still the socket file we bound (not a successor's)."""
    if ours is None:  # never bound
        return
    try:
        st = address.lstat()
    except FileNotFoundError:
        return
    if (st.st_dev, st.st_ino) == ours:
        address.unlink(missing_ok=True)
    else:
        log.warning(
            "socket replaced by someone else; left in place", extra={"address": str(address)}
        )


def sd_notify(state: str) -> bool:
    """Send STATE (e.g. "READY=1") to systemd's $NOTIFY_SOCKET; False if there is none.

    The protocol is one datagram on a unix socket (a leading "@" names an abstract one); a
    failure to send is logged, never fatal: readiness is also served by the health service.
    """
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("sd_notify failed", extra={"state": state, "error": str(exc)})
        return False
    return True


class _CallExecutor(futures.ThreadPoolExecutor):
    """gRPC's worker pool, counting the calls that are running (interpreter exit would wait
    for each of them)."""

    def __init__(self, max_workers: int) -> None:
        super().__init__(max_workers=max_workers, thread_name_prefix="rpc")
        self._running = 0
        self._count_lock = threading.Lock()

    def submit(self, fn, /, *args, **kwargs):
        def counted():
            with self._count_lock:
                self._running += 1
            try:
                return fn(*args, **kwargs)
            finally:
                with self._count_lock:
                    self._running -= 1

        return super().submit(counted)

    def running(self) -> int:
        with self._count_lock:
            return self._running


class Server:
    """The running service; `run` blocks until a signal or `stop`."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self._root_lock: int | None = _lock_root(config.root)  # before the root is touched
        self.workers: WorkerPool | None = None
        try:
            # Spawned before any gRPC channel or server thread exists (workers.py).
            self.workers = WorkerPool(config.convert_workers).start()
            self.snapshotter = Snapshotter(
                config.root,
                vm_mode=config.vm_mode,
                signing_key=Path(config.signing_key) if config.signing_key else None,
                kata_verity=config.kata_verity,
                limits=config.limits(),
                tail_packing=config.tail_packing,
                mount_style=config.mount_style,
                layer_caches=config.layer_caches,
                workers=self.workers,
            )
        except BaseException:
            if self.workers is not None:
                self.workers.close()
            self._release_root()
            raise
        self.health = health.HealthServicer()
        self._executor = _CallExecutor(config.workers)
        self.grpc = grpc.server(self._executor)
        snapshots_pb2_grpc.add_SnapshotsServicer_to_server(
            SnapshotsService(self.snapshotter), self.grpc
        )
        self.content = ContentClient(config.containerd_address)
        diff_pb2_grpc.add_DiffServicer_to_server(
            DiffService(
                self.snapshotter,
                self.content,
                self.workers,
                Path(config.containerd_content) if config.containerd_content else None,
            ),
            self.grpc,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        self._socket: tuple[int, int] | None = None
        self._stop_requested = threading.Event()
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()

    def start(self) -> None:
        try:
            _refuse_live_socket(self.config.address)  # before cleanup changes anything
            self.snapshotter.cleanup()
            self._socket = _listen(self.grpc, self.config.address)
        except BaseException:
            self.snapshotter.close()
            self.content.close()
            if self.workers is not None:
                self.workers.close()
            self._release_root()
            raise
        self.grpc.start()
        for name in ("", *SERVICE_NAMES):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "serving", extra={"address": str(self.config.address), "root": str(self.config.root)}
        )
        sd_notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS=serving on {self.config.address}")

    def request_stop(self) -> None:
        """Ask `run` to stop (safe from a signal handler or any thread)."""
        self._stop_requested.set()

    def stop(self) -> None:
        with self._stop_lock:
            if self._stopped.is_set():
                return
            self._stopped.set()
        sd_notify("STOPPING=1")
        self.health.enter_graceful_shutdown()
        self.grpc.stop(self.config.grace_seconds).wait()
        self.snapshotter.close()
        self.content.close()
        if self.workers is not None:
            self.workers.close()  # a conversion still running past the grace is killed
        _unlink_if_ours(self.config.address, self._socket)
        self._release_root()
        log.info("stopped")

    def _release_root(self) -> None:
        if self._root_lock is not None:
            os.close(self._root_lock)  # the flock goes with the last descriptor
            self._root_lock = None

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT (on whichever thread the kernel delivers it) or
        `request_stop`, then stop gracefully."""
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        previous = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        handlers = {
            sig: signal.signal(sig, lambda signum, frame: self.request_stop())
            for sig in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            self.start()
        except BaseException:
            self._restore_signals(previous, handlers, wake_r, wake_w)
            raise
        try:
            while not self._stop_requested.is_set():
                # A signal on any thread writes to wake_w; the Python handler then runs here.
                select.select([wake_r], [], [], WAKE_INTERVAL)
                with contextlib.suppress(BlockingIOError):
                    wake_r.recv(4096)
        finally:
            self.stop()
            self._restore_signals(previous, handlers, wake_r, wake_w)
        self._abandon_calls_past_grace()

    @staticmethod
    def _restore_signals(wakeup_fd: int, handlers: dict, *sockets: socket.socket) -> None:
        signal.set_wakeup_fd(wakeup_fd)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        for sock in sockets:
            sock.close()

    def _abandon_calls_past_grace(self) -> None:
        """Calls still running after the grace period (a long Commit) would keep the process
        alive until they end: exit now. What they leave is what a crash leaves (temp names),
        which the next start's cleanup removes."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        running = self._executor.running()
        if running:
            log.warning(
                "abandoning calls still running after the grace period", extra={"calls": running}
            )
            logging.shutdown()
            os._exit(0)
