"""A status line for long commands, on a terminal only.

`convert` and `merge` can run for minutes on big layers. On an interactive terminal they
show what they are doing on stderr, one line rewritten in place a few times a second and
erased at the end; when stderr is not a terminal (a log, a pipe, a test) they print nothing
extra, so `--json` output and logs stay clean.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import BinaryIO, TextIO

ERASE_LINE = "\r\x1b[K"  # carriage return, then erase to the end of the line
INTERVAL = 0.2  # seconds between redraws


class Progress:
    """One status line on `stream`, redrawn at most every INTERVAL seconds.

    Inactive (every call a no-op) unless `stream` is a terminal. Use as a context manager:
    the line is erased on exit, also when the command fails.
    """

    def __init__(self, label: str, stream: TextIO | None = None) -> None:
        self.label = label
        self.stream = sys.stderr if stream is None else stream
        try:
            self.active = self.stream.isatty()
        except (AttributeError, ValueError):  # closed or not a real file
            self.active = False
        self._next = 0.0
        self._shown = False

    def update(self, text: str | Callable[[], str], *, force: bool = False) -> None:
        """Show `text` (or what the callable returns, computed only when it is shown)."""
        if not self.active:
            return
        now = time.monotonic()
        if not force and now < self._next:
            return
        self._next = now + INTERVAL
        line = f"{self.label}: {text() if callable(text) else text}"
        width = _columns(self.stream)
        if width and len(line) >= width:
            line = line[: width - 1]  # a wrapped line could not be erased with \r
        self._write(ERASE_LINE + line)
        self._shown = True

    def close(self) -> None:
        if self._shown:
            self._write(ERASE_LINE)
            self._shown = False

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except OSError:  # the terminal went away: progress is not worth failing for
            self.active = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class CountingReader:
    """A read-only file wrapper that reports the bytes read so far to a `Progress`."""

    def __init__(self, source: BinaryIO, progress: Progress, total: int | None = None) -> None:
        self._src = source
        self._progress = progress
        self.total = total
        self.done = 0

    def read(self, size: int = -1) -> bytes:
        data = self._src.read(size)
        self.done += len(data)
        self._progress.update(self._describe)
        return data

    def _describe(self) -> str:
        if self.total:
            percent = min(100, self.done * 100 // self.total)
            return f"{human_bytes(self.done)} of {human_bytes(self.total)} read ({percent}%)"
        return f"{human_bytes(self.done)} read"


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _columns(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError):
        return 0
