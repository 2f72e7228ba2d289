"""A synchronous QMP session on top of `qemu.qmp` (its asyncio QMPClient on a private loop).

One class for both peers we drive: QEMU itself and qemu-storage-daemon. Errors become
`QmpCommandError` (the peer refused), `QmpGone` (the peer is not there or died) and `QmpTimeout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from qemu.qmp import EventListener, ExecuteError, QMPClient, QMPError, Runstate

from passthrough.errors import QmpCommandError, QmpGone, QmpTimeout

T = TypeVar("T")
Event = dict[str, Any]


class QmpSession:
    """QMP over a unix socket, with blocking calls. Not thread-safe: one user at a time."""

    def __init__(
        self,
        path: str | Path,
        name: str = "erofs-passthrough",
        timeout: float = 10.0,
        connect_timeout: float = 30.0,
    ) -> None:
        """CONNECT_TIMEOUT covers the greeting too: a QMP monitor serves one client at a
        time, so a second one waits (in the listen backlog) until the first disconnects."""
        self.path = str(path)
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._client = QMPClient(name)
        try:
            self._run(self._client.connect(self.path), connect_timeout, "connect")
        except BaseException:
            self.close()
            raise

    def _run(self, coro: Awaitable[T], timeout: float, what: str) -> T:
        try:
            return self._loop.run_until_complete(asyncio.wait_for(coro, timeout))
        except ExecuteError as exc:
            raise QmpCommandError(what, exc.error_class, str(exc)) from None
        except TimeoutError:
            raise QmpTimeout(f"{what}: no answer from {self.path} within {timeout}s") from None
        except (QMPError, OSError, EOFError) as exc:
            raise QmpGone(f"{what}: QMP peer at {self.path} is gone ({_reason(exc)})") from None

    @property
    def alive(self) -> bool:
        return self._client.runstate == Runstate.RUNNING

    def cmd(self, command: str, timeout: float | None = None, /, **arguments: Any) -> Any:
        """Execute COMMAND (arguments with QMP's dashed names passed as a dict via **).

        COMMAND and TIMEOUT are positional only: every keyword is a QMP argument."""
        if not self.alive:
            raise QmpGone(f"{command}: QMP peer at {self.path} is gone")
        return self._run(
            self._client.execute(command, arguments or None), timeout or self.timeout, command
        )

    @contextlib.contextmanager
    def listen(self, *names: str) -> Iterator[EventListener]:
        """Collect events named NAMES from now on (register before the command that causes
        them, so none is missed)."""
        listener = EventListener(names)
        with self._client.listen(listener):
            yield listener

    def wait_event(
        self, listener: EventListener, match: Callable[[Event], bool], timeout: float
    ) -> Event:
        """The first event from LISTENER for which MATCH is true; QmpGone if the peer dies."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise QmpTimeout(f"no matching {sorted(listener.names)} event within {timeout}s")
            if not self.alive and listener.empty():
                raise QmpGone(f"QMP peer at {self.path} went away while waiting for an event")
            try:
                event = self._loop.run_until_complete(
                    asyncio.wait_for(listener.get(), min(left, 0.2))
                )
            except TimeoutError:
                continue
            if match(dict(event)):
                return dict(event)

    def close(self) -> None:
        if self._loop.is_closed():
            return
        with contextlib.suppress(Exception):
            self._loop.run_until_complete(asyncio.wait_for(self._client.disconnect(), 2))
        self._loop.close()

    def __del__(self) -> None:  # a forgotten session must not leave asyncio tasks dangling
        with contextlib.suppress(Exception):
            self.close()

    def __enter__(self) -> QmpSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _reason(exc: BaseException) -> str:
    """The innermost cause in words: qemu.qmp wraps the OSError that says what happened
    (`ConnectError('Failed to establish connection', ConnectionRefusedError(111, ...))`)."""
    while True:
        inner = exc.__cause__ or next((a for a in exc.args if isinstance(a, BaseException)), None)
        if inner is None:
            break
        exc = inner
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__
