"""The service's conversion workers (snapshotter/service/workers.py): the same bytes and errors
as an in-process conversion, cancellation that leaves nothing behind, jobs in parallel, and a
worker's memory bounded for a 2 GiB layer."""

from __future__ import annotations

import os
import random
import tarfile
import threading
from pathlib import Path

import pytest

from snapshotter.erofs.limits import DEFAULT_LIMITS, Limits
from snapshotter.errors import EpError
from snapshotter.ingest.convert import convert_layer
from snapshotter.service import layer_build
from snapshotter.service.workers import Cancellation, Cancelled, WorkerPool, tar_job
from snapshotter.verity import KATA_VERITY
from tests.support.layers import gzip_tar

HANG_GUARD = 120  # seconds: a wait that long means a hang, not a slow machine


@pytest.fixture(scope="module")
def pool():
    p = WorkerPool(2).start()
    yield p
    p.close()


def _tar_request(out: Path, verity=True, limits: Limits = DEFAULT_LIMITS) -> dict:
    return tar_job(out, verity, limits)


def _feed_bytes(data: bytes):
    def feed(fd: int) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    return feed


def _layer(seed: int = 1) -> bytes:
    rng = random.Random(seed)
    files = {f"dir{i % 7}/file{i}": rng.randbytes(rng.randrange(0, 20000)) for i in range(300)}
    return gzip_tar(files)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for our purposes only once reaped; the pool reaps what it kills
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ", 1)[1][0] != "Z"


@pytest.mark.parametrize("verity", [True, KATA_VERITY], ids=["salted", "kata"])
def test_worker_output_is_the_in_process_output(pool, tmp_path, verity):
    data = _layer()
    (tmp_path / "layer.tar.gz").write_bytes(data)
    reply = pool.run(_tar_request(tmp_path / "w.erofs", verity), feed=_feed_bytes(data))
    local = convert_layer(
        str(tmp_path / "layer.tar.gz"), tmp_path / "l.erofs", verity=verity, blob_digest=True
    )
    assert (tmp_path / "w.erofs").read_bytes() == (tmp_path / "l.erofs").read_bytes()
    meta = layer_build.layer_meta(local, diff_id=local.diff_id or "")
    assert reply["root_hash"] == meta.root_hash and reply["diff_id"] == meta.diff_id
    assert reply["compressed_digest"] == local.compressed_digest


def test_a_blob_file_descriptor_is_the_same_as_the_stream(pool, tmp_path):
    data = _layer(4)
    (tmp_path / "blob").write_bytes(data)
    fd = os.open(tmp_path / "blob", os.O_RDONLY)
    try:
        from_fd = pool.run(_tar_request(tmp_path / "f.erofs"), source_fd=fd)
    finally:
        os.close(fd)
    streamed = pool.run(_tar_request(tmp_path / "s.erofs"), feed=_feed_bytes(data))
    from_fd.pop("maxrss_kib"), streamed.pop("maxrss_kib")
    assert from_fd == streamed
    assert (tmp_path / "f.erofs").read_bytes() == (tmp_path / "s.erofs").read_bytes()


def test_directory_conversion_in_a_worker_is_the_same(pool, tmp_path):
    src = tmp_path / "fs"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "b" / "f").write_bytes(b"hello" * 1000)
    (src / "g").write_bytes(b"")
    os.symlink("a/b/f", src / "link")
    got = pool.convert_directory(src, tmp_path / "w.erofs")
    want = layer_build.convert_directory(src, tmp_path / "l.erofs")
    assert got == want
    assert (tmp_path / "w.erofs").read_bytes() == (tmp_path / "l.erofs").read_bytes()


@pytest.mark.parametrize(
    "data",
    [
        _layer()[:4000],  # truncated gzip
        b"\x1f\x8b\x08\x00" + b"\x00" * 6 + b"garbage, not deflate" * 50,
        b"this is not a tar at all" * 100,
    ],
    ids=["truncated", "bad-deflate", "not-a-tar"],
)
def test_a_corrupt_layer_fails_with_the_in_process_error(pool, tmp_path, data):
    (tmp_path / "bad").write_bytes(data)
    with pytest.raises(EpError) as local:
        convert_layer(str(tmp_path / "bad"), tmp_path / "l.erofs", verity=True, blob_digest=True)
    with pytest.raises(EpError) as remote:
        pool.run(_tar_request(tmp_path / "w.erofs"), feed=_feed_bytes(data))
    assert type(remote.value) is type(local.value)
    assert str(remote.value) == str(local.value)
    assert "\n" not in str(remote.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def test_a_limit_in_a_worker_is_the_same_error(pool, tmp_path):
    data = _layer()
    tight = Limits(max_entries=10)
    (tmp_path / "l.tar.gz").write_bytes(data)
    with pytest.raises(EpError) as local:
        convert_layer(str(tmp_path / "l.tar.gz"), tmp_path / "l.erofs", limits=tight)
    with pytest.raises(EpError) as remote:
        pool.run(_tar_request(tmp_path / "w.erofs", limits=tight), feed=_feed_bytes(data))
    assert (type(remote.value), str(remote.value)) == (type(local.value), str(local.value))


def test_cancel_mid_layer_kills_the_worker_and_leaves_nothing(tmp_path):
    pool = WorkerPool(1).start()
    try:
        (pid,) = pool.pids()
        data = _layer()
        half = len(data) // 2
        fed_half = threading.Event()
        cancel = Cancellation()

        def feed(fd: int) -> None:
            _feed_bytes(data[:half])(fd)
            fed_half.set()
            # the client goes away while the layer is still arriving
            cancel.cancel()
            _feed_bytes(data[half:] * 50)(fd)  # raises BrokenPipe once the worker is dead

        out = tmp_path / ".layer-x.tmp"
        out.write_bytes(b"")  # publish_layer's temp name exists before the job
        with pytest.raises(Cancelled):
            pool.run(_tar_request(out), feed=feed, cancel=cancel)
        assert fed_half.is_set()
        assert not _alive(pid)
        assert list(tmp_path.iterdir()) == []
        # a fresh worker takes the dead one's place
        reply = pool.run(_tar_request(tmp_path / "next.erofs"), feed=_feed_bytes(data))
        assert reply["blob_size"] > 0
        assert pool.pids() and pool.pids() != [pid]
    finally:
        pool.close()


def test_cancel_while_the_worker_converts(tmp_path):
    """Cancel after the whole layer went in: the worker is killed mid-conversion."""
    pool = WorkerPool(1).start()
    try:
        (pid,) = pool.pids()
        cancel = Cancellation()
        started = threading.Event()

        def feed(fd: int) -> None:
            _feed_bytes(_layer(2))(fd)
            started.set()

        timer = threading.Thread(target=lambda: started.wait(HANG_GUARD) and cancel.cancel())
        timer.start()
        try:
            pool.run(_tar_request(tmp_path / "o.erofs"), feed=feed, cancel=cancel)
        except Cancelled:
            assert not _alive(pid)
        timer.join()
        # either way (it may have finished first), no temp file is left
        assert [p.name for p in tmp_path.iterdir() if p.name != "o.erofs"] == []
    finally:
        pool.close()


def test_two_jobs_progress_in_parallel(pool, tmp_path):
    """Job A holds its input open until job B has finished: B never waits behind A."""
    b_done = threading.Event()
    data = _layer(3)
    errors: list[BaseException] = []

    def feed_a(fd: int) -> None:
        _feed_bytes(data[: len(data) // 2])(fd)
        assert b_done.wait(HANG_GUARD), "job B did not finish while job A was running"
        _feed_bytes(data[len(data) // 2 :])(fd)

    def run_a() -> None:
        try:
            pool.run(_tar_request(tmp_path / "a.erofs"), feed=feed_a)
        except BaseException as exc:
            errors.append(exc)

    a = threading.Thread(target=run_a)
    a.start()
    pool.run(_tar_request(tmp_path / "b.erofs"), feed=_feed_bytes(data))
    b_done.set()
    a.join()
    assert errors == []
    assert (tmp_path / "a.erofs").read_bytes() == (tmp_path / "b.erofs").read_bytes()


def test_a_worker_that_dies_is_an_error_and_is_replaced(tmp_path):
    pool = WorkerPool(1).start()
    try:
        (pid,) = pool.pids()

        def feed(fd: int) -> None:
            os.kill(pid, 9)
            _feed_bytes(_layer())(fd)

        with pytest.raises(EpError, match=r"ended without a reply.*signal 9"):
            pool.run(_tar_request(tmp_path / "o.erofs"), feed=feed)
        assert list(tmp_path.iterdir()) == []
        assert pool.run(_tar_request(tmp_path / "o.erofs"), feed=_feed_bytes(_layer()))
    finally:
        pool.close()


def test_a_2gib_layer_converts_under_256mib_rss_in_a_worker(tmp_path):
    """The tar streams in through the pipe (never whole in memory on either side)."""
    pool = WorkerPool(1).start()
    block = random.Random(7).randbytes(1 << 20)
    files, file_size = 8, 256 << 20  # 2 GiB of data that is no hole

    def feed(fd: int) -> None:
        write = _feed_bytes
        for i in range(files):
            info = tarfile.TarInfo(f"big/{i}")
            info.size, info.mtime = file_size, 1
            write(info.tobuf(tarfile.PAX_FORMAT))(fd)
            for _ in range(file_size // len(block)):
                write(block)(fd)
        write(b"\0" * 10240)(fd)

    try:
        reply = pool.run(_tar_request(tmp_path / "big.erofs"), feed=feed)
    finally:
        pool.close()
    assert reply["blob_size"] >= files * file_size
    assert reply["maxrss_kib"] < 256 * 1024, f"worker peak RSS {reply['maxrss_kib']} KiB"


def test_a_workers_peak_rss_is_its_own_not_its_parents(tmp_path):
    """Linux carries ru_maxrss across exec: a worker spawned by a large process (a long test
    session once reached ~470 MiB) must still report only its own peak."""
    ballast = bytearray(400 << 20)
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1
    pool = WorkerPool(1).start()
    try:
        reply = pool.run(_tar_request(tmp_path / "small.erofs"), feed=_feed_bytes(_layer()))
    finally:
        pool.close()
        del ballast
    assert reply["maxrss_kib"] < 200 * 1024, f"worker peak RSS {reply['maxrss_kib']} KiB"


def test_tail_packing_reaches_the_worker(pool, tmp_path):
    """The serve key `tail_packing` travels in the job: a worker packs tails exactly as an
    in-process conversion does, and without it writes the whole-block image."""
    from snapshotter.erofs.format import LAYOUT_FLAT_INLINE
    from snapshotter.erofs.reader import ErofsImage
    from snapshotter.service.serve_config import ConfigError, load_config

    data = _layer(5)
    (tmp_path / "layer.tar.gz").write_bytes(data)
    request = tar_job(tmp_path / "w.erofs", True, DEFAULT_LIMITS, tail_packing=True)
    reply = pool.run(request, feed=_feed_bytes(data))
    local = convert_layer(
        str(tmp_path / "layer.tar.gz"),
        tmp_path / "l.erofs",
        verity=True,
        blob_digest=True,
        tail_packing=True,
    )
    assert (tmp_path / "w.erofs").read_bytes() == (tmp_path / "l.erofs").read_bytes()
    assert reply["root_hash"] == local.verity.root_hash
    plain = pool.run(_tar_request(tmp_path / "p.erofs"), feed=_feed_bytes(data))
    assert plain["blob_size"] > reply["blob_size"]
    with ErofsImage(tmp_path / "w.erofs") as img:
        packed = [i for _, i in img.walk() if i.inode.layout == LAYOUT_FLAT_INLINE]
        assert any(i.inode.size > img.block_size for i in packed)

    src = tmp_path / "fs"
    src.mkdir()
    (src / "f").write_bytes(random.Random(2).randbytes(3 * 4096 + 100))
    got = pool.convert_directory(src, tmp_path / "wd.erofs", tail_packing=True)
    want = layer_build.convert_directory(src, tmp_path / "ld.erofs", tail_packing=True)
    assert got == want
    assert got.blob_size < layer_build.convert_directory(src, tmp_path / "pd.erofs").blob_size

    assert load_config(None).tail_packing is False
    assert load_config(None, tail_packing=True).tail_packing is True
    with pytest.raises(ConfigError, match="tail-packing must be a boolean"):
        load_config(None, tail_packing="yes")
