"""Host side of the guest agent protocol (`passthrough.agent_protocol`; the guest is
`passthrough.guest`): JSON lines over the unix socket QEMU exposes for the agent's
virtio-serial port."""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from passthrough.agent_protocol import is_refusal
from passthrough.errors import AgentFailure, Refused


class AgentClient:
    """One connection to the guest agent. The port admits one host connection at a time."""

    def __init__(
        self, path: str | Path, timeout: float = 30.0, alive: Callable[[], bool] | None = None
    ) -> None:
        self.path = str(path)
        self.timeout = timeout
        self._alive = alive or (lambda: True)
        self._ids = itertools.count(1)
        self._sock = self._connect()

    def _connect(self) -> socket.socket:
        self._buf = b""
        self._greeted = False
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            raise AgentFailure(f"cannot connect to the agent port {self.path}: {exc}") from None
        return sock

    def reconnect(self) -> None:
        """Drop the connection and open a new one (the agent reopens its port for it)."""
        self.close()
        self._sock = self._connect()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _readline(self, deadline: float) -> bytes:
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AgentFailure(f"agent did not answer within {self.timeout}s")
            if not self._alive():
                raise AgentFailure("the VM went away while waiting for the agent")
            self._sock.settimeout(min(left, 0.25))
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as exc:  # QEMU went away under us
                raise AgentFailure(f"agent connection lost: {exc}") from None
            if not chunk:
                raise AgentFailure("agent connection closed by QEMU")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def _greet(self, deadline: float) -> None:
        """Make sure the agent has the port open before the first request of a connection.

        Bytes the host sends while the guest side of the virtio-serial port is closed (the
        agent reopens it after every disconnect) can stay in QEMU's socket until more bytes
        arrive (seen with QEMU 7.2: about one new connection in a hundred). So the first
        exchange is a ping sent again every half second until one is answered; answers to the
        earlier copies are dropped by id like any stale reply."""
        while True:
            req_id = next(self._ids)
            self._send({"id": req_id, "op": "ping"})
            retry_at = min(deadline, time.monotonic() + 0.5)
            try:
                while json.loads(self._readline(retry_at)).get("id") != req_id:
                    pass
            except AgentFailure:
                now = time.monotonic()
                if now < retry_at or now >= deadline:
                    raise  # the VM or the connection went away, or we are out of time
                continue
            self._greeted = True
            return

    def _send(self, request: dict[str, Any]) -> None:
        try:
            self._sock.sendall((json.dumps(request) + "\n").encode())
        except OSError as exc:
            raise AgentFailure(f"agent connection lost: {exc}") from None

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        """Send one request; return its result or raise AgentFailure (with the guest errno),
        Refused when the guest declined on policy.

        An op-side `timeout` argument (seconds the agent may wait) extends the reply deadline.
        """
        if not self._greeted:
            self._greet(time.monotonic() + self.timeout)
        req_id = next(self._ids)
        self._send({"id": req_id, "op": op, **args})
        deadline = time.monotonic() + max(self.timeout, float(args.get("timeout") or 0) + 5)
        while True:
            reply = json.loads(self._readline(deadline))
            if reply.get("id") == req_id:
                break  # older replies (of requests that timed out) are dropped
        if is_refusal(reply):
            raise Refused(
                f"agent {op} refused: {reply.get('error')}",
                str(reply.get("error")),
                reply.get("errno"),
            )
        if not reply.get("ok"):
            raise AgentFailure(f"agent {op}: {reply.get('error')}", reply.get("errno"))
        return reply["result"]

    # Convenience wrappers, one per op (see docs/passthrough.md).

    def ping(self) -> dict[str, Any]:
        return self.call("ping")

    def run(self, *argv: str, timeout: float = 30.0, image: str | None = None) -> dict[str, Any]:
        """ARGV in the guest; with IMAGE, chrooted into that open image's root."""
        if image is None:
            return self.call("run", argv=list(argv), timeout=timeout)
        return self.call("run", argv=list(argv), timeout=timeout, image=image)

    def block_devices(self) -> list[dict[str, Any]]:
        return self.call("block_devices")["devices"]

    def wait_block(
        self, serial: str | None = None, pci: str | None = None, timeout: float = 10.0
    ) -> dict[str, Any]:
        return self.call("wait_block", serial=serial, pci=pci, timeout=timeout)

    def wait_block_gone(self, name: str, timeout: float = 10.0) -> None:
        self.call("wait_block_gone", name=name, timeout=timeout)

    def verity_open(self, name: str, table: str) -> str:
        """Open dm-verity NAME with TABLE (`VerityInfo.table_line`); returns its node."""
        return self.call("verity_open", name=name, table=table)["device"]

    def verity_status(self, name: str) -> dict[str, Any]:
        return self.call("verity_status", name=name)

    def verity_close(self, name: str) -> None:
        self.call("verity_close", name=name)

    def mount(
        self,
        source: str,
        target: str | None = None,
        fstype: str = "erofs",
        options: list[str] | None = None,
    ) -> str:
        return self.call(
            "mount", source=source, target=target, fstype=fstype, options=options or []
        )["target"]

    def umount(self, target: str) -> None:
        self.call("umount", target=target)

    def teardown(self) -> dict[str, Any]:
        return self.call("teardown")

    def hash_tree(self, root: str) -> dict[str, Any]:
        return self.call("hash_tree", root=root, timeout=300)["entries"]

    def read_file(self, path: str, offset: int = 0, length: int | None = None) -> bytes:
        res = self.call("read_file", path=path, offset=offset, length=length)
        return base64.b64decode(res["data"])

    def read_speed(self, path: str, limit: int | None = None) -> dict[str, Any]:
        return self.call("read_speed", path=path, limit=limit, timeout=600)
