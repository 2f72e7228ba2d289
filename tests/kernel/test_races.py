"""Races inside one service: Commit against Commit and Remove, Cleanup against Prepare, and a
container swapping files under a Commit. The Snapshotter runs on a real root with real EROFS
conversions and kernel mounts; where a race needs a deterministic moment, a hook inside the
real conversion (or a Python audit hook just before the import opens a file) creates it."""

from __future__ import annotations

import hashlib
import os
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from shim_integration.testbed.containerd_private import unmount_under
from snapshotter.errors import AlreadyExists, EpError, FailedPrecondition, InvalidArgument, NotFound
from snapshotter.service import layer_build
from snapshotter.service.snapshots import Snapshotter
from tests.support.converters import SwappableConverter
from tests.support.helpers import require_root

LOSING_COMMIT = (NotFound, AlreadyExists, FailedPrecondition)
BLOB_DIGEST = layer_build.LABEL_PREFIX + "blob.digest"


@pytest.fixture
def converter() -> SwappableConverter:
    return SwappableConverter()


@pytest.fixture
def sn(tmp_path: Path, converter: SwappableConverter) -> Iterator[Snapshotter]:
    s = Snapshotter(tmp_path / "root", convert=converter)
    yield s
    s.close()
    unmount_under(tmp_path)


def _prepare_with(sn: Snapshotter, key: str, files: dict[str, bytes]) -> Path:
    upper = Path(sn.prepare(key)[0].source)
    for name, data in files.items():
        (upper / name).write_bytes(data)
    return upper


def _slow_first_conversion(
    converter: SwappableConverter, after_first: Callable[[], None]
) -> threading.Event:
    """Make the first conversion announce itself and wait a little (the window a concurrent
    call lands in); a later conversion first runs AFTER_FIRST (e.g. wait for the first
    Commit to finish). Both conversions are the real one."""
    converting = threading.Event()
    calls = []

    def convert(src: Path, out: Path) -> layer_build.LayerMeta:
        calls.append(src)
        if len(calls) == 1:
            converting.set()
            threading.Event().wait(0.3)
        else:
            after_first()
        return layer_build.convert_directory(src, out)

    converter.hook = convert
    return converting


def _layer_matches_labels(sn: Snapshotter, name: str) -> None:
    """What a user checks: the committed blob is the one its labels name, and a child sees
    the committed file through the kernel's mount of it."""
    info = sn.stat(name)
    sid = sn.store.committed_chain(name)[0]
    blob = sn.layout.layer(sid).read_bytes()
    size = int(info.labels[layer_build.LABEL_PREFIX + "blob.size"])
    assert "sha256:" + hashlib.sha256(blob[:size]).hexdigest() == info.labels[BLOB_DIGEST]
    assert (sn.layout.mount_layer(sid) / "hello").read_bytes() == b"committed content\n"


def test_two_commits_of_one_key_keep_the_layer(
    sn: Snapshotter, converter: SwappableConverter
) -> None:
    require_root()
    _prepare_with(sn, "ns/1/a", {"hello": b"committed content\n"})
    first_done = threading.Event()
    converting = _slow_first_conversion(converter, lambda: first_done.wait(10))
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(sn.commit, "ns/2/A", "ns/1/a")
        assert converting.wait(10)
        second = pool.submit(sn.commit, "ns/2/B", "ns/1/a")
        first.result(timeout=60)
        first_done.set()
        with pytest.raises(LOSING_COMMIT):
            second.result(timeout=60)
    _layer_matches_labels(sn, "ns/2/A")
    assert [i.name for i in sn.walk()] == ["ns/2/A"]


def test_remove_during_commit_waits_and_keeps_the_layer(
    sn: Snapshotter, converter: SwappableConverter
) -> None:
    require_root()
    _prepare_with(sn, "ns/1/a", {"hello": b"committed content\n"})
    converting = _slow_first_conversion(converter, lambda: None)
    with ThreadPoolExecutor(2) as pool:
        commit = pool.submit(sn.commit, "ns/2/A", "ns/1/a")
        assert converting.wait(10)
        remove = pool.submit(sn.remove, "ns/1/a")
        commit.result(timeout=60)
        with pytest.raises(NotFound):
            remove.result(timeout=60)
    _layer_matches_labels(sn, "ns/2/A")


def test_commit_with_empty_name_is_invalid(sn: Snapshotter) -> None:
    _prepare_with(sn, "ns/1/a", {"hello": b"x\n"})
    with pytest.raises(InvalidArgument):
        sn.commit("", "ns/1/a")
    assert sn.stat("ns/1/a").kind.name == "ACTIVE"


def test_cleanup_racing_prepares_keeps_every_snapshot(sn: Snapshotter, request) -> None:
    """containerd's GC calls Cleanup while a pull Prepares: nothing live may go."""
    keys = [f"ns/{i}/extract-{i}" for i in range(150)]
    done = threading.Event()
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # preempt often: the race windows are microseconds wide
    request.addfinalizer(lambda: sys.setswitchinterval(switch))

    def cleanups() -> int:
        rounds = 0
        while not done.is_set():
            sn.cleanup()
            rounds += 1
        return rounds

    with ThreadPoolExecutor(8) as pool:
        cleaners = [pool.submit(cleanups) for _ in range(2)]
        try:
            prepares = [pool.submit(sn.prepare, k) for k in keys]
            failed = [repr(p.exception(timeout=60)) for p in prepares if p.exception(timeout=60)]
        finally:
            done.set()
        assert all(c.result(timeout=60) > 0 for c in cleaners)
    assert failed == []
    lost = [k for k in keys if not Path(sn.mounts(k)[0].source).is_dir()]
    assert lost == []
    assert sn.cleanup() == []


# -- a container swapping files under Commit ---------------------------------------------------

_before_open: list[Callable[[str, int], None]] = []


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _before_open and isinstance(args[0], (str, bytes)):
        _before_open[0](os.fsdecode(args[0]), args[2] if len(args) > 2 else 0)


sys.addaudithook(_audit)  # audit hooks cannot be removed: this one does nothing unless armed


@pytest.fixture
def swap_before_open() -> Iterator[Callable[[str, Callable[[], None]], None]]:
    """Arm: the first time the import opens a file called NAME, run SWAP just before."""

    def arm(name: str, swap: Callable[[], None]) -> None:
        def hook(path: str, flags: int) -> None:
            if os.path.basename(path) == name and _before_open:
                _before_open.clear()
                swap()

        _before_open[:] = [hook]

    yield arm
    _before_open.clear()


def _commit_in_thread(
    sn: Snapshotter, name: str, key: str, timeout: float = 30
) -> BaseException | None:
    result: list[BaseException | None] = []

    def run() -> None:
        try:
            sn.commit(name, key)
            result.append(None)
        except BaseException as exc:  # handed to the test
            result.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    return result[0] if result else TimeoutError(f"Commit still running after {timeout} s")


def _files_containing(root: Path, needle: bytes) -> list[Path]:
    found = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath, name)
            if path.is_file() and not path.is_symlink() and needle in path.read_bytes():
                found.append(path)
    return found


def test_commit_never_follows_a_swapped_in_symlink(
    sn: Snapshotter, tmp_path: Path, swap_before_open
) -> None:
    secret = b"host secret " + os.urandom(16).hex().encode()
    host_file = tmp_path / "host-secret"
    host_file.write_bytes(secret)
    # Same size as the secret: the old import read lstat's size worth of the host file.
    upper = _prepare_with(sn, "ns/1/a", {"victim": b"c" * len(secret), "z": b"z\n"})

    def swap() -> None:
        tmp_link = upper / ".link"
        os.symlink(host_file, tmp_link)
        os.rename(tmp_link, upper / "victim")

    swap_before_open("victim", swap)
    error = _commit_in_thread(sn, "ns/2/A", "ns/1/a")
    assert not _before_open, "the import never opened the file"
    assert _files_containing(sn.root, secret) == []
    assert isinstance(error, EpError) and "victim" in str(error), error
    assert sn.stat("ns/1/a").kind.name == "ACTIVE"  # the failed Commit changed nothing
    assert (
        sorted(
            p.name
            for p in sn.layout.dir(sn.store.get_info("ns/1/a")[0]).iterdir()
            if p.name.endswith(".tmp")
        )
        == []
    )


def test_commit_never_hangs_on_a_swapped_in_fifo(sn: Snapshotter, swap_before_open) -> None:
    upper = _prepare_with(sn, "ns/1/a", {"victim": b"container data\n"})

    def swap() -> None:
        os.unlink(upper / "victim")
        os.mkfifo(upper / "victim")

    swap_before_open("victim", swap)
    error = _commit_in_thread(sn, "ns/2/A", "ns/1/a", timeout=10)
    if isinstance(error, TimeoutError):  # unblock the old code's open() so the test can end
        fd = os.open(upper / "victim", os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
    assert isinstance(error, EpError) and "victim" in str(error), error
    assert sn.stat("ns/1/a").kind.name == "ACTIVE"


def test_commit_of_an_unchanged_tree_keeps_every_kind(sn: Snapshotter) -> None:
    """The descriptor walk still imports what a layer holds: files, hardlinks, symlinks,
    devices, FIFOs, xattrs, nested directories."""
    require_root()
    upper = _prepare_with(sn, "ns/1/a", {"hello": b"committed content\n"})
    (upper / "d" / "e").mkdir(parents=True)
    (upper / "d" / "e" / "f").write_bytes(b"deep\n")
    os.link(upper / "hello", upper / "d" / "hard")
    os.symlink("../hello", upper / "d" / "link")
    os.mkfifo(upper / "fifo")
    os.mknod(upper / "wh", 0o20000 | 0o644, os.makedev(0, 0))
    os.setxattr(upper / "d", "trusted.overlay.opaque", b"y")
    os.setxattr(upper / "hello", "user.note", b"kept")
    sn.commit("ns/2/A", "ns/1/a")
    _layer_matches_labels(sn, "ns/2/A")
    sid = sn.store.committed_chain("ns/2/A")[0]
    mnt = sn.layout.mount_layer(sid)
    assert (mnt / "d" / "e" / "f").read_bytes() == b"deep\n"
    assert os.stat(mnt / "d" / "hard").st_ino == os.stat(mnt / "hello").st_ino
    assert os.readlink(mnt / "d" / "link") == "../hello"
    assert os.path.exists(mnt / "fifo") and os.stat(mnt / "fifo").st_mode & 0o170000 == 0o10000
    assert os.stat(mnt / "wh").st_rdev == os.makedev(0, 0)
    assert os.getxattr(mnt / "d", "trusted.overlay.opaque") == b"y"
    assert os.getxattr(mnt / "hello", "user.note") == b"kept"


def test_cleanup_racing_vm_mode_prepares_keeps_their_chain_images(sn: Snapshotter) -> None:
    """A VM-mode Prepare builds its chain's fsmeta before its row exists: a Cleanup then
    must neither delete the build in progress nor the finished image."""
    from snapshotter.service.vm_mode import VM_MODE_LABEL

    _prepare_with(sn, "ns/1/a", {"hello": b"committed content\n"})
    sn.commit("ns/2/A", "ns/1/a")
    done = threading.Event()

    def cleanups() -> int:
        rounds = 0
        while not done.is_set():
            sn.cleanup()
            rounds += 1
        return rounds

    problems: list[str] = []
    with ThreadPoolExecutor(2) as pool:
        cleaner = pool.submit(cleanups)
        try:
            for i in range(15):  # each round builds the chain image anew
                key = f"ns/3/vm-{i}"
                try:
                    mounts = sn.prepare(key, "ns/2/A", {VM_MODE_LABEL: "true"})
                except Exception as exc:  # what the old code raised: report, go on
                    problems.append(f"{key}: {exc!r}")
                    continue
                if not Path(mounts[0].source).is_file():
                    problems.append(f"{key}: {mounts[0].source} missing")
                sn.remove(key)
        finally:
            done.set()
        assert cleaner.result(timeout=60) > 0
    assert problems == []


def test_no_layer_is_written_into_a_snapshot_committed_meanwhile(sn: Snapshotter) -> None:
    """What the differ's Apply (and a late Commit) takes before writing a layer: once the
    snapshot is committed or removed, the lock is refused with containerd's codes."""
    _prepare_with(sn, "ns/1/a", {"hello": b"committed content\n"})
    sid = sn.store.get_info("ns/1/a")[0]
    sn.commit("ns/2/A", "ns/1/a")
    layer = sn.layout.layer(sid).read_bytes()
    with pytest.raises(FailedPrecondition), sn.layout.busy(sid):
        pytest.fail("a committed snapshot was opened for writing")
    sn.remove("ns/2/A")
    with pytest.raises(NotFound), sn.layout.busy(sid):
        pytest.fail("a removed snapshot was opened for writing")
    assert layer  # the committed blob was there until Remove
