"""The gRPC server containerd talks to: Snapshots, Diff and health checking.

The socket is created with mode 0600 (containerd runs as root); SIGTERM/SIGINT stop the server
gracefully (in-flight calls get a few seconds), then the metadata database is closed.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from snapshotter.api.containerd.services.diff.v1 import diff_pb2_grpc
from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2_grpc
from snapshotter.content_client import ContentClient
from snapshotter.diff_service import DiffService
from snapshotter.errors import EpError
from snapshotter.serve_config import ServeConfig
from snapshotter.snapshots import Snapshotter
from snapshotter.snapshots_service import SnapshotsService

log = logging.getLogger(__name__)
SERVICE_NAMES = ("containerd.services.snapshots.v1.Snapshots", "containerd.services.diff.v1.Diff")


def _listen(server: grpc.Server, address: Path) -> None:
    address.parent.mkdir(parents=True, exist_ok=True)
    address.unlink(missing_ok=True)
    old = os.umask(0o177)
    try:
        if server.add_insecure_port(f"unix:{address}") == 0:
            raise EpError(f"cannot listen on {address}")
    finally:
        os.umask(old)


class Server:
    """The running service; `run` blocks until a signal or `stop`."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.snapshotter = Snapshotter(
            config.root, vm_mode=config.vm_mode,
            signing_key=Path(config.signing_key) if config.signing_key else None)
        self.health = health.HealthServicer()
        self.grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=config.workers))
        snapshots_pb2_grpc.add_SnapshotsServicer_to_server(
            SnapshotsService(self.snapshotter), self.grpc)
        self.content = ContentClient(config.containerd_address)
        diff_pb2_grpc.add_DiffServicer_to_server(DiffService(self.snapshotter, self.content),
                                                 self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        self._stopped = threading.Event()

    def start(self) -> None:
        self.snapshotter.cleanup()
        _listen(self.grpc, self.config.address)
        self.grpc.start()
        for name in ("", *SERVICE_NAMES):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving", extra={"address": str(self.config.address),
                                   "root": str(self.config.root)})

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.health.enter_graceful_shutdown()
        self.grpc.stop(self.config.grace_seconds).wait()
        self.snapshotter.close()
        self.content.close()
        self.config.address.unlink(missing_ok=True)
        log.info("stopped")

    def run(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: threading.Thread(target=self.stop).start())
        self.start()
        self._stopped.wait()
        self.grpc.wait_for_termination()
