"""Apply through the real service, whose conversions run in worker processes
(snapshotter/service/workers.py): a client cancelling mid-layer leaves no temp file and no
busy worker, and the snapshot still takes the layer afterwards; a corrupt layer fails with
the error an in-process conversion gives."""

from __future__ import annotations

import hashlib
import io
import os
import random
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from isal import igzip

from shim_integration.testbed.containerd_private import (
    Containerd,
    SnapshotterProcess,
    system_dist,
    unmount_under,
)
from snapshotter.errors import EpError
from snapshotter.ingest.convert import convert_layer
from snapshotter.service.api.containerd.services.diff.v1 import diff_pb2, diff_pb2_grpc
from snapshotter.service.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter.service.api.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from snapshotter.service.api.containerd.types import descriptor_pb2
from tests.support.helpers import require_root, require_tool
from tests.support.layers import gzip_tar

DEADLINE = 120.0
HEADER = (("containerd-namespace", "default"),)
GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


def _children(pid: int) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(") ", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                found.add(int(entry))
    return found


def _wait(predicate, what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[Containerd, SnapshotterProcess]]:
    require_root()
    require_tool("containerd")
    config = tmp_path / "serve.toml"
    config.write_text("convert_workers = 2\n")
    sock = tmp_path / "sn.sock"
    containerd = Containerd(system_dist(), tmp_path / "containerd", sock).start()
    service = SnapshotterProcess(
        tmp_path / "root",
        sock,
        tmp_path / "sn.log",
        extra=["--containerd-address", str(containerd.socket), "--config", str(config)],
    )
    try:
        service.start()
        yield containerd, service
    finally:
        if service.proc is not None and service.proc.poll() is None:
            service.stop()
        containerd.stop()
        unmount_under(tmp_path)


def _ingest(containerd: Containerd, tmp_path: Path, name: str, blob: bytes):
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    path = tmp_path / name
    path.write_bytes(blob)
    containerd.ingest(path, digest)
    return descriptor_pb2.Descriptor(media_type=GZIP, digest=digest, size=len(blob)), path


def _big_layer(tmp_path: Path) -> bytes:
    """~96 MiB of incompressible files: seconds of conversion, so a cancel lands mid-layer."""
    rng = random.Random(5)
    raw = tmp_path / "big.tar"
    with tarfile.open(raw, "w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(12):
            data = rng.randbytes(8 << 20)
            info = tarfile.TarInfo(f"big/{i}")
            info.size, info.mtime = len(data), 1
            tar.addfile(info, io.BytesIO(data))
    with open(raw, "rb") as src:
        blob = igzip.compress(src.read(), compresslevel=0)
    raw.unlink()
    return blob


def test_cancelled_apply_leaves_no_temp_file_and_no_busy_worker(stack, tmp_path: Path) -> None:
    containerd, service = stack
    assert service.proc is not None
    workers = _children(service.proc.pid)
    assert len(workers) == 2  # convert_workers, started with serve
    layer, _ = _ingest(containerd, tmp_path, "big.tar.gz", _big_layer(tmp_path))
    with grpc.insecure_channel(f"unix:{service.socket}") as channel:
        stub = pb_grpc.SnapshotsStub(channel)
        differ = diff_pb2_grpc.DiffStub(channel)
        key = "default/1/extract-big"
        mounts = stub.Prepare(
            pb.PrepareSnapshotRequest(key=key), metadata=HEADER, timeout=DEADLINE
        ).mounts
        snapshot_dir = Path(mounts[0].source).parent

        def temp_files() -> list[str]:
            return sorted(p.name for p in snapshot_dir.iterdir() if p.name.endswith(".tmp"))

        call = differ.Apply.future(
            diff_pb2.ApplyRequest(diff=layer, mounts=mounts), metadata=HEADER, timeout=DEADLINE
        )
        # the worker's own temp output: the conversion is under way
        _wait(lambda: any(n.count(".tmp") == 2 for n in temp_files()), "the conversion to start")
        assert not call.done()
        call.cancel()
        _wait(lambda: temp_files() == [], "the temp output to go")
        # the busy worker killed (and reaped), the idle one untouched, a fresh one in its place
        _wait(lambda: len(_children(service.proc.pid) & workers) == 1, "the busy one to go")
        _wait(lambda: len(_children(service.proc.pid)) == 2, "a replacement worker")
        assert not (snapshot_dir / "layer.erofs").exists()
        info = stub.Stat(pb.StatSnapshotRequest(key=key), metadata=HEADER, timeout=DEADLINE).info
        assert info.kind == pb.ACTIVE
        # the same snapshot takes the layer afterwards
        applied = differ.Apply(
            diff_pb2.ApplyRequest(diff=layer, mounts=mounts), metadata=HEADER, timeout=DEADLINE
        ).applied
        assert applied.digest.startswith("sha256:")
        assert (snapshot_dir / "layer.erofs").is_file() and temp_files() == []
        assert len(_children(service.proc.pid)) == 2


def test_corrupt_layer_is_the_in_process_error(stack, tmp_path: Path) -> None:
    containerd, service = stack
    good = gzip_tar({f"f{i}": random.Random(i).randbytes(50_000) for i in range(20)})
    layer, path = _ingest(containerd, tmp_path, "cut.tar.gz", good[: len(good) // 2])
    with pytest.raises(EpError) as local:
        convert_layer(str(path), tmp_path / "local.erofs", verity=True, blob_digest=True)
    with grpc.insecure_channel(f"unix:{service.socket}") as channel:
        stub = pb_grpc.SnapshotsStub(channel)
        mounts = stub.Prepare(
            pb.PrepareSnapshotRequest(key="default/1/extract-cut"),
            metadata=HEADER,
            timeout=DEADLINE,
        ).mounts
        with pytest.raises(grpc.RpcError) as err:
            diff_pb2_grpc.DiffStub(channel).Apply(
                diff_pb2.ApplyRequest(diff=layer, mounts=mounts), metadata=HEADER, timeout=DEADLINE
            )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert err.value.details() == str(local.value)
    snapshot_dir = Path(mounts[0].source).parent
    assert [p.name for p in snapshot_dir.iterdir() if p.name.endswith(".tmp")] == []
