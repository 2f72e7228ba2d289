"""Layer conversions in worker processes: the service's conversions use every core.

One serving process converts on one interpreter lock, so containerd 2.x's parallel unpack
(one Apply per layer at once) queued. A `WorkerPool` keeps N fresh interpreters
(`python -m snapshotter.service.workers FD`), spawned before the gRPC server has threads and
never forked from it (a fork of a process with gRPC threads is unsafe; `subprocess` execs at
once). Each speaks a tiny framed protocol over a unix socket pair: a request is a 4-byte
big-endian length and a JSON object, with the layer's file descriptor attached
(SCM_RIGHTS); the reply is a frame of the same kind. The layer streams to the worker through
that descriptor, a pipe the RPC thread fills from containerd's content stream, or a file; its
bytes never pass through the socket.

What a job guarantees:
- errors come back as the same one-line `EpError` class and message the in-process conversion
  raises (an `OSError` keeps its errno and path); anything else is a bug and carries the
  worker's traceback;
- cancellation (`Cancellation.cancel`, which Apply registers as its RPC's termination
  callback) kills the worker at once; the job's temp outputs are removed before `run`
  returns, and a fresh worker replaces the dead one;
- the output is what the in-process conversion writes, byte for byte (same code, same input);
- a reply carries the worker's peak RSS (`maxrss_kib`), so its bound can be checked.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any

from snapshotter.erofs.limits import Limits
from snapshotter.errors import EpError
from snapshotter.heap import keep_freed_buffers
from snapshotter.verity import VerityParams

if TYPE_CHECKING:
    from snapshotter.service.layer_build import LayerMeta

_HEADER = struct.Struct("!I")
# The directory our `snapshotter` package is in: a worker started there runs the very code
# the service runs (a checkout, a virtualenv), whatever the service's working directory.
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]
_MAX_FRAME = 1 << 24
PIPE_BYTES = 1 << 20  # the layer pipe's kernel buffer: fewer wake-ups per MiB


class Cancelled(EpError):
    """The conversion was stopped: the client went away or cancelled its call."""


class WorkerDied(EpError):
    """A worker process ended without replying (killed, out of memory)."""


def _send(sock: socket.socket, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
    body = json.dumps(message).encode()
    frame = _HEADER.pack(len(body)) + body
    sent = socket.send_fds(sock, [frame], list(fds)) if fds else sock.send(frame)
    if sent < len(frame):
        sock.sendall(frame[sent:])


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    parts, left = [], n
    while left:
        try:
            chunk = sock.recv(left)
        except ConnectionResetError:  # the peer died with data unread
            return None
        if not chunk:
            return None
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def _recv(sock: socket.socket, max_fds: int = 0) -> tuple[dict[str, Any], list[int]] | None:
    """One frame and the descriptors that came with it; None at end of stream."""
    fds: list[int] = []
    if max_fds:
        head, fds, _, _ = socket.recv_fds(sock, _HEADER.size, max_fds)
        if len(head) < _HEADER.size and head:
            rest = _recv_exact(sock, _HEADER.size - len(head))
            head = head + rest if rest else b""
    else:
        head = _recv_exact(sock, _HEADER.size) or b""
    if len(head) < _HEADER.size:
        for fd in fds:
            os.close(fd)
        return None
    (size,) = _HEADER.unpack(head)
    if size > _MAX_FRAME:
        raise EpError(f"worker frame of {size} bytes")
    body = _recv_exact(sock, size)
    if body is None:
        return None
    return json.loads(body), fds


# --- the wire form of a job's parameters ---------------------------------------------------


def verity_to_wire(verity: bool | VerityParams) -> Any:
    if isinstance(verity, bool):
        return verity
    d = asdict(verity)
    d["salt"] = verity.salt.hex()
    d["uuid"] = verity.uuid.hex() if verity.uuid is not None else None
    return d


def verity_from_wire(value: Any) -> bool | VerityParams:
    if isinstance(value, bool):
        return value
    d = dict(value)
    d["salt"] = bytes.fromhex(d["salt"])
    d["uuid"] = bytes.fromhex(d["uuid"]) if d["uuid"] is not None else None
    return VerityParams(**d)


def tar_job(
    out: Path, verity: bool | VerityParams, limits: Limits, tail_packing: bool = False
) -> dict[str, Any]:
    """A tar / tar.gz / tar.zst layer (the job's fd) converted into OUT."""
    return {
        "op": "tar",
        "out": str(out),
        "verity": verity_to_wire(verity),
        "limits": asdict(limits),
        "tail_packing": tail_packing,
    }


def native_job(out: Path, digest: str, verity: bool | VerityParams) -> dict[str, Any]:
    """A native EROFS layer (the job's fd) checked against DIGEST and stored into OUT."""
    return {"op": "native", "out": str(out), "digest": digest, "verity": verity_to_wire(verity)}


def dir_job(
    src: Path, out: Path, verity: bool | VerityParams, tail_packing: bool = False
) -> dict[str, Any]:
    """The directory SRC converted into OUT."""
    return {
        "op": "dir",
        "src": str(src),
        "out": str(out),
        "verity": verity_to_wire(verity),
        "tail_packing": tail_packing,
    }


def _error_to_wire(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, EpError):
        cls = type(exc)
        return {"class": f"{cls.__module__}:{cls.__qualname__}", "message": str(exc)}
    if isinstance(exc, OSError):
        return {
            "oserror": [exc.errno, exc.strerror, exc.filename],
            "message": str(exc),
        }
    return {"bug": "".join(traceback.format_exception(exc))}


def _error_from_wire(error: dict[str, Any]) -> BaseException:
    if "oserror" in error:
        errno_, strerror, filename = error["oserror"]
        if errno_ is None:
            return OSError(error["message"])
        return OSError(errno_, strerror, filename) if filename else OSError(errno_, strerror)
    if "bug" in error:
        return RuntimeError("conversion worker failed:\n" + error["bug"])
    module, _, name = error["class"].partition(":")
    cls: Any = EpError
    with contextlib.suppress(Exception):
        found = import_module(module)
        for part in name.split("."):
            found = getattr(found, part)
        if isinstance(found, type) and issubclass(found, EpError):
            cls = found
    exc = cls.__new__(cls)
    Exception.__init__(exc, error["message"])  # the same class and one-line message
    return exc


# --- the worker process --------------------------------------------------------------------


def _job(request: dict[str, Any], fds: list[int]) -> dict[str, Any]:
    """Run one job in the worker; the LayerMeta fields (+ compressed_digest) of its output."""
    from snapshotter.service import layer_build

    op, out = request["op"], Path(request["out"])
    verity = verity_from_wire(request["verity"])
    if op == "dir":
        return asdict(
            layer_build.convert_directory(
                Path(request["src"]), out, verity=verity, tail_packing=request["tail_packing"]
            )
        )
    with os.fdopen(fds.pop(0), "rb", buffering=PIPE_BYTES) as source:
        if op == "tar":
            from snapshotter.ingest.convert import convert_layer

            result = convert_layer(
                source,
                out,
                verity=verity,
                blob_digest=True,
                limits=Limits(**request["limits"]),
                tail_packing=request["tail_packing"],
            )
        elif op == "native":
            from snapshotter.ingest.convert import import_erofs_image

            result = import_erofs_image(
                source, out, expected_digest=request["digest"], verity=verity
            )
        else:
            raise EpError(f"worker: unknown job {op!r}")
    meta = layer_build.layer_meta(result, diff_id=result.diff_id or "")
    return {**asdict(meta), "compressed_digest": result.compressed_digest}


def _maxrss_kib() -> int:
    """This interpreter's peak RSS: VmHWM, the high-water mark of its own address space.

    Not `getrusage(RUSAGE_SELF).ru_maxrss`: Linux carries that figure across exec, so a
    worker spawned by a big process (a long test session, say) reported its parent's peak."""
    with open("/proc/self/status", "rb") as status:
        for line in status:
            if line.startswith(b"VmHWM:"):
                return int(line.split()[1])
    raise OSError("no VmHWM in /proc/self/status")


def worker_main(fd: int) -> int:
    """Serve jobs on socket FD until the service closes it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the service stops us, not the terminal
    keep_freed_buffers()  # a conversion's chunks reuse the heap (snapshotter/heap.py)
    sock = socket.socket(fileno=fd)
    _send(sock, {"ready": os.getpid()})
    while True:
        frame = _recv(sock, max_fds=4)
        if frame is None:
            return 0
        request, fds = frame
        try:
            reply: dict[str, Any] = {"ok": _job(request, fds)}
        except BaseException as exc:  # every failure goes back to the caller
            reply = {"error": _error_to_wire(exc)}
        finally:
            for extra in fds:
                os.close(extra)
        reply["maxrss_kib"] = _maxrss_kib()
        try:
            _send(sock, reply)
        except OSError:
            return 0


# --- the service's side --------------------------------------------------------------------


class _Worker:
    def __init__(self, python: str) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.proc = subprocess.Popen(
                [python, "-m", "snapshotter.service.workers", str(child.fileno())],
                pass_fds=[child.fileno()],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                cwd=_PACKAGE_ROOT,
                start_new_session=True,  # a terminal's Ctrl-C is the service's to handle
            )
        finally:
            child.close()
        self.sock = parent
        self.ready = False

    def wait_ready(self) -> None:
        if self.ready:
            return
        frame = _recv(self.sock)
        if frame is None or "ready" not in frame[0]:
            raise WorkerDied(f"conversion worker {self.proc.pid} did not start: {self._status()}")
        self.ready = True

    def _status(self) -> str:
        code = self.proc.poll()
        if code is None:
            return "still running"
        return f"killed by signal {-code}" if code < 0 else f"exit status {code}"

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait()
        self.sock.close()

    def close(self) -> None:
        self.sock.close()  # the worker sees end of stream and exits
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.kill()


class Cancellation:
    """A job's stop switch: `cancel()` (thread-safe, idempotent) kills the worker running
    the job and runs what `on_cancel` registered (e.g. cancelling the content stream)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cancelled = False
        self._hooks: list[Callable[[], None]] = []

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def on_cancel(self, hook: Callable[[], None]) -> Callable[[], None]:
        """Run HOOK on cancel (at once if already cancelled); the returned call detaches it."""
        with self._lock:
            if not self._cancelled:
                self._hooks.append(hook)
                return lambda: self._detach(hook)
        hook()
        return lambda: None

    def _detach(self, hook: Callable[[], None]) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._hooks.remove(hook)

    def cancel(self) -> None:
        with self._lock:
            self._cancelled, hooks, self._hooks = True, self._hooks, []
        for hook in hooks:
            with contextlib.suppress(Exception):
                hook()


Feed = Callable[[int], None]  # writes the layer into the pipe's write end


class WorkerPool:
    """SIZE conversion workers (default: one per CPU), started by `start`."""

    def __init__(self, size: int = 0, python: str = sys.executable) -> None:
        self.size = size or len(os.sched_getaffinity(0)) or 1
        self.python = python
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []
        self._busy: set[_Worker] = set()
        self._slots = threading.BoundedSemaphore(self.size)
        self._closed = False

    def start(self) -> WorkerPool:
        """Spawn every worker now (before the caller starts gRPC threads) and wait for them."""
        workers = [_Worker(self.python) for _ in range(self.size)]
        try:
            for w in workers:
                w.wait_ready()
        except BaseException:
            for w in workers:
                w.kill()
            raise
        with self._lock:
            self._idle.extend(workers)
        return self

    def close(self) -> None:
        """Stop idle workers and kill busy ones (their jobs fail as cancelled)."""
        with self._lock:
            self._closed, idle, self._idle = True, self._idle, []
            busy = list(self._busy)
        for w in idle:
            w.close()
        for w in busy:
            _kill_only(w)

    def pids(self) -> list[int]:
        """The idle workers' process ids."""
        with self._lock:
            return [w.proc.pid for w in self._idle]

    def _take(self) -> _Worker:
        self._slots.acquire()
        try:
            with self._lock:
                if self._closed:
                    raise EpError("the conversion workers are shut down")
                worker = self._idle.pop() if self._idle else None
            if worker is None or worker.proc.poll() is not None:
                if worker is not None:
                    worker.kill()
                worker = _Worker(self.python)
            worker.wait_ready()
            with self._lock:
                self._busy.add(worker)
            return worker
        except BaseException:
            self._slots.release()
            raise

    def _give_back(self, worker: _Worker, alive: bool = True) -> None:
        """End WORKER's job: back to the idle list, or closed if the pool is; a dead one
        (ALIVE false, already killed) is replaced at once by a fresh interpreter (its start
        overlaps whatever comes next; `_take` waits for its ready frame)."""
        replacement = None
        if not alive and not self._closed:
            with contextlib.suppress(OSError):  # else the next take spawns one
                replacement = _Worker(self.python)
        with self._lock:
            self._busy.discard(worker)
            keep = alive and not self._closed
            if keep:
                self._idle.append(worker)
            elif replacement is not None and not self._closed:
                self._idle.append(replacement)
                replacement = None
        if replacement is not None:
            replacement.kill()
        if alive and not keep:
            worker.close()
        self._slots.release()

    def run(
        self,
        request: dict[str, Any],
        feed: Feed | None = None,
        source_fd: int | None = None,
        cancel: Cancellation | None = None,
    ) -> dict[str, Any]:
        """Run REQUEST in a worker; its reply's `ok` object, or its error raised here.

        The layer reaches the worker either as SOURCE_FD (a file; the caller keeps its copy)
        or through a pipe that FEED(write_fd) fills from this thread. Any failure or a
        cancel kills the worker and removes the job's temp outputs next to `out`.
        """
        cancel = cancel or Cancellation()
        worker = self._take()
        detach = cancel.on_cancel(lambda: _kill_only(worker))
        read_fd = write_fd = -1
        try:
            if feed is not None:
                read_fd, write_fd = os.pipe()
                with contextlib.suppress(OSError):
                    fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
                fds = [read_fd]
            else:
                fds = [source_fd] if source_fd is not None else []
            _send(worker.sock, request, fds)
            if read_fd >= 0:
                os.close(read_fd)
                read_fd = -1
            if feed is not None:
                try:
                    feed(write_fd)
                except BrokenPipeError:
                    pass  # the worker stopped reading: its reply says why
                finally:
                    os.close(write_fd)
                    write_fd = -1
            frame = _recv(worker.sock)
            if cancel.cancelled:
                raise Cancelled(f"conversion into {request.get('out')} cancelled")
            if frame is None:
                worker.proc.wait()
                raise WorkerDied(
                    f"conversion worker {worker.proc.pid} ended without a reply "
                    f"({worker._status()})"
                )
            reply = frame[0]
        except BaseException as exc:
            detach()
            worker.kill()
            self._give_back(worker, alive=False)
            _remove_outputs(request, including_out=True)
            if cancel.cancelled and not isinstance(exc, Cancelled):
                raise Cancelled(f"conversion into {request.get('out')} cancelled") from None
            raise
        finally:
            for fd in (read_fd, write_fd):
                if fd >= 0:
                    os.close(fd)
        detach()
        self._give_back(worker)
        if "error" in reply:
            _remove_outputs(request)
            raise _error_from_wire(reply["error"])
        return {**reply["ok"], "maxrss_kib": reply["maxrss_kib"]}

    def convert_directory(
        self, src: Path, out: Path, verity: bool | VerityParams = True, tail_packing: bool = False
    ) -> LayerMeta:
        """`layer_build.convert_directory` in a worker: the same LayerMeta."""
        from snapshotter.service.layer_build import LayerMeta

        reply = self.run(dir_job(src, out, verity, tail_packing))
        reply.pop("maxrss_kib")
        return LayerMeta(**reply)


def _kill_only(worker: _Worker) -> None:
    with contextlib.suppress(ProcessLookupError):
        worker.proc.kill()


def _remove_outputs(request: dict[str, Any], including_out: bool = False) -> None:
    """A stopped job's partial files: the temp names atomic writes make beside OUT, and OUT
    itself for a killed worker (which may have been writing it)."""
    out = request.get("out")
    if not out:
        return
    path = Path(out)
    if including_out:
        path.unlink(missing_ok=True)
    with contextlib.suppress(FileNotFoundError):
        for leftover in path.parent.glob(f".{path.name}.*.tmp"):
            leftover.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(worker_main(int(sys.argv[1])))
