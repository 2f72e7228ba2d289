"""`serve` as a daemon: one server per root and per socket, SIGTERM on any thread, systemd
readiness, private store files, and a SIGTERM in the middle of a long Commit. Each test runs the
real `serve` process on a fresh root and talks to it over its unix socket."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from shim_integration.testbed.containerd_private import REPO, SnapshotterProcess, unmount_under
from snapshotter.service.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter.service.api.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from tests.support.helpers import error_lines, mounted_erofs, require_root

SYS_TGKILL = 234  # x86_64
SIGTERM_BIT = 1 << (signal.SIGTERM - 1)


@pytest.fixture
def started(tmp_path: Path) -> Iterator[list[SnapshotterProcess]]:
    """The servers a test starts; whatever still runs at the end is killed."""
    procs: list[SnapshotterProcess] = []
    yield procs
    for p in procs:
        if p.proc is not None and p.proc.poll() is None:
            p.kill()
    unmount_under(tmp_path)


def _serve_args(root: Path, sock: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "shim_integration.cli",
        "serve",
        "--root",
        str(root),
        "--address",
        str(sock),
    ]


def _run_refused(root: Path, sock: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        _serve_args(root, sock), cwd=REPO, capture_output=True, text=True, timeout=15
    )
    assert proc.returncode != 0, proc.stderr
    return proc


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    errors = error_lines(proc.stderr)
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return errors[0]


def test_second_serve_on_the_same_root_is_refused(tmp_path: Path, started) -> None:
    first = SnapshotterProcess(tmp_path / "root", tmp_path / "a.sock", tmp_path / "a.log")
    started.append(first.start())
    with grpc.insecure_channel(f"unix:{first.socket}") as ch:
        pb_grpc.SnapshotsStub(ch).Prepare(pb.PrepareSnapshotRequest(key="ns/1/live"))
    staged = tmp_path / "root" / "snapshots" / "new-inflight"  # what a running Prepare has
    staged.mkdir()
    refused = _run_refused(tmp_path / "root", tmp_path / "b.sock")
    line = _one_error_line(refused)
    assert str(tmp_path / "root") in line and "already" in line, line
    assert staged.is_dir()  # no cleanup ran on a root someone else serves
    assert not (tmp_path / "b.sock").exists()
    assert first.healthy()
    assert first.stop() == 0


def test_second_serve_on_a_live_socket_is_refused(tmp_path: Path, started) -> None:
    first = SnapshotterProcess(tmp_path / "root1", tmp_path / "sn.sock", tmp_path / "a.log")
    started.append(first.start())
    inode = first.socket.stat().st_ino
    line = _one_error_line(_run_refused(tmp_path / "root2", tmp_path / "sn.sock"))
    assert str(tmp_path / "sn.sock") in line, line
    assert first.socket.stat().st_ino == inode and first.healthy()
    assert first.stop() == 0


def test_stale_socket_is_replaced_and_a_foreign_one_is_left(tmp_path: Path, started) -> None:
    sock = tmp_path / "sn.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock))  # a crashed server's socket file: nobody listens
    stale.close()
    first = SnapshotterProcess(tmp_path / "root1", sock, tmp_path / "a.log")
    started.append(first.start())
    # An operator moves it aside and starts another server on the path: the first server's
    # exit must not unlink a socket that is no longer its own.
    moved = tmp_path / "old.sock"
    os.rename(sock, moved)
    second = SnapshotterProcess(tmp_path / "root2", sock, tmp_path / "b.log")
    started.append(second.start())
    assert first.stop() == 0
    assert second.healthy()
    assert second.stop() == 0
    assert not sock.exists()


def test_not_a_socket_at_the_address_is_refused(tmp_path: Path, started) -> None:
    sock = tmp_path / "sn.sock"
    sock.write_text("someone's file\n")
    line = _one_error_line(_run_refused(tmp_path / "root", sock))
    assert str(sock) in line, line
    assert sock.read_text() == "someone's file\n"


def _tgkill(pid: int, tid: int, sig: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(SYS_TGKILL, pid, tid, sig) != 0:
        raise OSError(ctypes.get_errno(), f"tgkill {pid} {tid}")


def _threads_taking_sigterm(pid: int) -> list[int]:
    """Non-main threads of PID that do not block SIGTERM (the kernel may deliver it there)."""
    tids = []
    for task in sorted(Path(f"/proc/{pid}/task").iterdir()):
        if int(task.name) == pid:
            continue
        status = (task / "status").read_text()
        blocked = int(
            next(x for x in status.splitlines() if x.startswith("SigBlk:")).split()[1], 16
        )
        if not blocked & SIGTERM_BIT:
            tids.append(int(task.name))
    return tids


def test_sigterm_delivered_to_another_thread_stops_the_server(tmp_path: Path, started) -> None:
    if os.uname().machine != "x86_64":
        pytest.skip("SYS_tgkill number is the x86_64 one")
    for round_ in range(3):  # a different thread each round: gRPC's and the executor's
        proc = SnapshotterProcess(
            tmp_path / "root", tmp_path / "sn.sock", tmp_path / f"{round_}.log"
        )
        started.append(proc.start())
        with grpc.insecure_channel(f"unix:{proc.socket}") as ch:  # wake a worker thread
            list(pb_grpc.SnapshotsStub(ch).List(pb.ListSnapshotsRequest()))
        assert proc.proc is not None
        tids = _threads_taking_sigterm(proc.proc.pid)
        assert tids, "no thread besides the main one"
        _tgkill(proc.proc.pid, tids[-1 - round_ % len(tids)], signal.SIGTERM)
        try:
            assert proc.proc.wait(timeout=15) == 0
        except subprocess.TimeoutExpired:
            pytest.fail(f"serve ignored a SIGTERM delivered to thread {tids[-1]}")
        assert not proc.socket.exists()


def test_store_files_are_private_in_a_0755_root(tmp_path: Path, started) -> None:
    root = tmp_path / "state"
    root.mkdir(mode=0o755)
    root.chmod(0o755)  # what systemd's StateDirectory= creates
    proc = SnapshotterProcess(root, tmp_path / "sn.sock", tmp_path / "a.log")
    started.append(proc.start())
    with grpc.insecure_channel(f"unix:{proc.socket}") as ch:
        pb_grpc.SnapshotsStub(ch).Prepare(pb.PrepareSnapshotRequest(key="ns/1/a"))
    names = {"metadata.db", "metadata.db-wal", "metadata.db-shm"}
    assert names <= {p.name for p in root.iterdir()}
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in root.iterdir() if p.is_file()}
    assert modes and all(m & 0o077 == 0 for m in modes.values()), modes
    assert proc.stop() == 0


def test_existing_world_readable_store_is_made_private(tmp_path: Path, started) -> None:
    root = tmp_path / "state"
    root.mkdir(mode=0o755)
    (root / "metadata.db").touch(mode=0o644)
    os.chmod(root / "metadata.db", 0o644)  # left by an older version
    proc = SnapshotterProcess(root, tmp_path / "sn.sock", tmp_path / "a.log")
    started.append(proc.start())
    assert stat.S_IMODE((root / "metadata.db").stat().st_mode) == 0o600
    assert proc.stop() == 0


class NotifySocket:
    """systemd's side of sd_notify: a datagram socket whose messages we collect."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(20)
        self.path = path

    def next(self) -> set[str]:
        return set(self.sock.recv(4096).decode().split("\n")) - {""}


def test_readiness_is_notified_after_listening(tmp_path: Path, started, monkeypatch) -> None:
    notify = NotifySocket(tmp_path / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify.path))
    proc = SnapshotterProcess(tmp_path / "root", tmp_path / "sn.sock", tmp_path / "a.log")
    with open(proc.log, "ab") as log:
        proc.proc = subprocess.Popen(
            _serve_args(proc.root, proc.socket), cwd=REPO, stdout=log, stderr=log
        )
    started.append(proc)
    try:
        ready = notify.next()
    except TimeoutError:
        pytest.fail(f"no READY=1 in 20 s:\n{proc.log.read_text()}")
    assert "READY=1" in ready
    assert proc.healthy()  # READY means containerd can connect now
    proc.proc.terminate()
    assert "STOPPING=1" in notify.next()
    assert proc.proc.wait(timeout=20) == 0


def test_sigterm_during_a_long_commit_leaves_nothing_half_written(tmp_path: Path, started) -> None:
    require_root()
    root = tmp_path / "root"
    config = tmp_path / "serve.toml"
    config.write_text("grace_seconds = 0.2\n")  # the Commit outlives the grace period
    proc = SnapshotterProcess(
        root, tmp_path / "sn.sock", tmp_path / "a.log", ["--config", str(config)]
    )
    started.append(proc.start())
    with grpc.insecure_channel(f"unix:{proc.socket}") as ch:
        stub = pb_grpc.SnapshotsStub(ch)
        upper = Path(stub.Prepare(pb.PrepareSnapshotRequest(key="ns/1/a")).mounts[0].source)
        block = os.urandom(1 << 20)
        with open(upper / "big", "wb") as f:
            for _ in range(96):
                f.write(block)
        many = upper / "many"  # many entries: a conversion of seconds, not of the disk's speed
        many.mkdir()
        for i in range(20000):
            (many / f"f{i}").write_bytes(block[i : i + 1024])
        (upper / "hello").write_text("hello\n")
        commit = stub.Commit.future(pb.CommitSnapshotRequest(key="ns/1/a", name="ns/2/A"))
        sdir = upper.parent
        deadline = time.monotonic() + 30
        while not any(p.name.endswith(".tmp") for p in sdir.iterdir()):
            assert time.monotonic() < deadline and not commit.done(), "Commit never converted"
            time.sleep(0.01)
        proc.proc.terminate()
        assert proc.proc.wait(timeout=30) == 0
        threading.Thread(target=lambda: commit.exception(), daemon=True).start()
    restarted = SnapshotterProcess(root, tmp_path / "sn.sock", tmp_path / "b.log")
    started.append(restarted.start())
    assert "abandoning calls still running" in proc.log.read_text()
    cleaned = [line for line in restarted.log.read_text().splitlines() if '"cleanup"' in line]
    assert cleaned and ".tmp" in cleaned[0]  # the interrupted conversion, removed at start
    leftovers = [
        str(p)
        for p in root.rglob("*")
        if p.name.endswith(".tmp") or p.name.startswith(("fs.old", "new-"))
    ]
    assert leftovers == []
    with grpc.insecure_channel(f"unix:{restarted.socket}") as ch:
        stub = pb_grpc.SnapshotsStub(ch)
        kinds = {i.name: i.kind for r in stub.List(pb.ListSnapshotsRequest()) for i in r.info}
        assert kinds == {"ns/1/a": pb.ACTIVE}  # stopped before its transaction: redo it
        assert (upper / "hello").read_text() == "hello\n"
        stub.Commit(pb.CommitSnapshotRequest(key="ns/1/a", name="ns/2/A"), timeout=300)
        stub.View(pb.ViewSnapshotRequest(key="ns/3/v", parent="ns/2/A"))
    with mounted_erofs(root / "snapshots" / sdir.name / "layer.erofs") as lower:
        assert (lower / "hello").read_text() == "hello\n"
        assert (lower / "big").stat().st_size == 96 << 20
    assert restarted.stop() == 0


def test_commit_with_an_empty_name_is_invalid_argument(tmp_path: Path, started) -> None:
    proc = SnapshotterProcess(tmp_path / "root", tmp_path / "sn.sock", tmp_path / "a.log")
    started.append(proc.start())
    with grpc.insecure_channel(f"unix:{proc.socket}") as ch:
        stub = pb_grpc.SnapshotsStub(ch)
        stub.Prepare(pb.PrepareSnapshotRequest(key="ns/1/a"))
        with pytest.raises(grpc.RpcError) as err:
            stub.Commit(pb.CommitSnapshotRequest(key="ns/1/a", name=""))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert stub.Stat(pb.StatSnapshotRequest(key="ns/1/a")).info.kind == pb.ACTIVE
    assert proc.stop() == 0


def test_cleanup_calls_during_a_pull_keep_every_snapshot(tmp_path: Path, started) -> None:
    """containerd's GC calls Cleanup while unpacks Prepare: ~100 Prepares against a stream of
    Cleanups over the socket, then every snapshot still has its directory."""
    from concurrent.futures import ThreadPoolExecutor

    proc = SnapshotterProcess(tmp_path / "root", tmp_path / "sn.sock", tmp_path / "a.log")
    started.append(proc.start())
    keys = [f"ns/{i}/extract-{i}" for i in range(120)]
    done = threading.Event()
    with grpc.insecure_channel(f"unix:{proc.socket}") as ch:
        stub = pb_grpc.SnapshotsStub(ch)

        def cleanups() -> int:
            rounds = 0
            while not done.is_set():
                stub.Cleanup(pb.CleanupRequest(), timeout=30)
                rounds += 1
            return rounds

        with ThreadPoolExecutor(10) as pool:
            cleaners = [pool.submit(cleanups) for _ in range(3)]
            try:
                sources = list(
                    pool.map(
                        lambda k: (
                            stub.Prepare(pb.PrepareSnapshotRequest(key=k), timeout=30)
                            .mounts[0]
                            .source
                        ),
                        keys,
                    )
                )
            finally:
                done.set()
            assert all(c.result(timeout=60) > 0 for c in cleaners)
        assert [s for s in sources if not Path(s).is_dir()] == []
        assert stub.Stat(pb.StatSnapshotRequest(key=keys[-1])).info.kind == pb.ACTIVE
    assert proc.stop() == 0
