"""Failures as containerd (and its user) sees them over the real service: an unreachable content
store is UNAVAILABLE naming the address, a full disk is RESOURCE_EXHAUSTED naming the path, and
neither loses the snapshot or leaves a half-written file."""

from __future__ import annotations

import hashlib
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from shim_integration.testbed.containerd_private import SnapshotterProcess, unmount_under
from snapshotter.service.api.containerd.services.diff.v1 import diff_pb2, diff_pb2_grpc
from snapshotter.service.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter.service.api.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from snapshotter.service.api.containerd.types import descriptor_pb2
from tests.support.helpers import require_root, require_tool
from tests.support.layers import gzip_tar

DEADLINE = 60.0
MiB = 1 << 20


def leftovers(snapshot_dir: Path) -> list[str]:
    return sorted(p.name for p in snapshot_dir.iterdir() if p.name.endswith(".tmp"))


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs: room for a snapshot's files, not for them and their layer too."""
    require_root()
    mnt = tmp_path / "disk"
    mnt.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(mnt)], check=True
    )
    try:
        yield mnt
    finally:
        unmount_under(mnt)
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_commit_names_the_path_and_loses_nothing(tmp_path: Path, small_disk: Path):
    service = SnapshotterProcess(small_disk / "root", tmp_path / "sn.sock", tmp_path / "sn.log")
    service.start()
    try:
        with grpc.insecure_channel(f"unix:{service.socket}") as channel:
            stub = pb_grpc.SnapshotsStub(channel)
            mounts = stub.Prepare(pb.PrepareSnapshotRequest(key="ns/1/big"), timeout=DEADLINE)
            upper = Path(mounts.mounts[0].source)
            data = random.Random(28).randbytes(1 * MiB)  # incompressible: the layer is as big
            (upper / "data").write_bytes(data)
            filler = small_disk / "filler"
            filler.write_bytes(b"\0" * (5 * MiB // 2))
            with pytest.raises(grpc.RpcError) as err:
                stub.Commit(
                    pb.CommitSnapshotRequest(key="ns/1/big", name="ns/1/done"), timeout=DEADLINE
                )
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
            details = err.value.details()
            assert details.startswith("No space left on device (ENOSPC)"), details
            assert str(small_disk / "root") in details and "\n" not in details
            # nothing lost, nothing half-written
            info = stub.Stat(pb.StatSnapshotRequest(key="ns/1/big"), timeout=DEADLINE).info
            assert info.kind == pb.ACTIVE
            assert (
                hashlib.sha256((upper / "data").read_bytes()).digest()
                == hashlib.sha256(data).digest()
            )
            assert leftovers(upper.parent) == []
            # with room again, the same Commit works
            filler.unlink()
            stub.Commit(
                pb.CommitSnapshotRequest(key="ns/1/big", name="ns/1/done"), timeout=DEADLINE
            )
            info = stub.Stat(pb.StatSnapshotRequest(key="ns/1/done"), timeout=DEADLINE).info
            assert info.kind == pb.COMMITTED
    finally:
        service.stop()
    log = service.log.read_text()
    assert "ENOSPC" in log and "Traceback" not in log


def test_unreachable_content_store_is_unavailable(tmp_path: Path) -> None:
    require_root()
    nowhere = tmp_path / "no-containerd.sock"
    service = SnapshotterProcess(
        tmp_path / "root",
        tmp_path / "sn.sock",
        tmp_path / "sn.log",
        extra=["--containerd-address", str(nowhere)],
    )
    service.start()
    try:
        with grpc.insecure_channel(f"unix:{service.socket}") as channel:
            stub = pb_grpc.SnapshotsStub(channel)
            mounts = stub.Prepare(
                pb.PrepareSnapshotRequest(key="ns/1/extract"), timeout=DEADLINE
            ).mounts
            layer = descriptor_pb2.Descriptor(
                media_type="application/vnd.oci.image.layer.v1.tar+gzip",
                digest="sha256:" + "ab" * 32,
                size=123,
            )
            with pytest.raises(grpc.RpcError) as err:
                diff_pb2_grpc.DiffStub(channel).Apply(
                    diff_pb2.ApplyRequest(diff=layer, mounts=mounts), timeout=DEADLINE
                )
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
            details = err.value.details()
            assert details.startswith(f"containerd's content store at {nowhere} is unreachable:")
            assert "\n" not in details and "RpcError" not in details and "<" not in details
            info = stub.Stat(pb.StatSnapshotRequest(key="ns/1/extract"), timeout=DEADLINE).info
            assert info.kind == pb.ACTIVE
            upper = Path(mounts[0].source)
            assert list(upper.iterdir()) == [] and leftovers(upper.parent) == []
    finally:
        service.stop()
        unmount_under(tmp_path)


def test_disk_full_apply_names_the_snapshot_directory(tmp_path: Path, small_disk: Path) -> None:
    """Through the differ, with the blob in a real containerd's content store."""
    from shim_integration.testbed.containerd_private import Containerd, system_dist

    require_tool("containerd")
    service_sock = tmp_path / "sn.sock"
    containerd = Containerd(system_dist(), tmp_path / "containerd", service_sock).start()
    service = SnapshotterProcess(
        small_disk / "root",
        service_sock,
        tmp_path / "sn.log",
        extra=["--containerd-address", str(containerd.socket)],
    )
    try:
        blob = gzip_tar({"data": random.Random(29).randbytes(1 * MiB)})
        digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        (tmp_path / "layer.tar.gz").write_bytes(blob)
        containerd.ingest(tmp_path / "layer.tar.gz", digest)
        service.start()
        filler = small_disk / "filler"
        filler.write_bytes(b"\0" * (3 * MiB))
        header = (("containerd-namespace", "default"),)
        layer = descriptor_pb2.Descriptor(
            media_type="application/vnd.oci.image.layer.v1.tar+gzip", digest=digest, size=len(blob)
        )
        with grpc.insecure_channel(f"unix:{service_sock}") as channel:
            stub = pb_grpc.SnapshotsStub(channel)
            differ = diff_pb2_grpc.DiffStub(channel)
            mounts = stub.Prepare(
                pb.PrepareSnapshotRequest(key="default/1/extract"),
                metadata=header,
                timeout=DEADLINE,
            ).mounts
            snapshot_dir = Path(mounts[0].source).parent
            with pytest.raises(grpc.RpcError) as err:
                differ.Apply(
                    diff_pb2.ApplyRequest(diff=layer, mounts=mounts),
                    metadata=header,
                    timeout=DEADLINE,
                )
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
            assert err.value.details() == f"No space left on device (ENOSPC): {snapshot_dir}"
            assert leftovers(snapshot_dir) == [] and not (snapshot_dir / "layer.erofs").exists()
            filler.unlink()
            applied = differ.Apply(
                diff_pb2.ApplyRequest(diff=layer, mounts=mounts), metadata=header, timeout=DEADLINE
            ).applied
            import gzip

            assert applied.digest == "sha256:" + hashlib.sha256(gzip.decompress(blob)).hexdigest()
    finally:
        if service.proc is not None and service.proc.poll() is None:
            service.stop()
        containerd.stop()
        unmount_under(tmp_path)


def test_configured_ceilings_reach_the_differ(tmp_path: Path) -> None:
    """serve's max_entries / max_tar_bytes keys bound what one Apply may convert: a layer over
    either is INVALID_ARGUMENT naming the ceiling, the snapshot stays active with nothing
    half-written, and a layer within both applies."""
    from shim_integration.testbed.containerd_private import Containerd, system_dist

    require_root()
    require_tool("containerd")
    config = tmp_path / "serve.toml"
    config.write_text(f"max_entries = 5\nmax_tar_bytes = {256 * 1024}\n")
    service_sock = tmp_path / "sn.sock"
    containerd = Containerd(system_dist(), tmp_path / "containerd", service_sock).start()
    service = SnapshotterProcess(
        tmp_path / "root",
        service_sock,
        tmp_path / "sn.log",
        extra=["--containerd-address", str(containerd.socket), "--config", str(config)],
    )
    layers = {
        "entries": (gzip_tar({f"f{i}": b"x" for i in range(8)}), "more than 5 entries"),
        "bytes": (gzip_tar({"big": bytes(300 * 1024)}), f"more than {256 * 1024} bytes"),
        "fits": (gzip_tar({"a": b"a", "b": bytes(100 * 1024)}), None),
    }
    header = (("containerd-namespace", "default"),)
    try:
        service.start()
        with grpc.insecure_channel(f"unix:{service_sock}") as channel:
            stub = pb_grpc.SnapshotsStub(channel)
            differ = diff_pb2_grpc.DiffStub(channel)
            for name, (blob, refusal) in layers.items():
                digest = "sha256:" + hashlib.sha256(blob).hexdigest()
                (tmp_path / f"{name}.tar.gz").write_bytes(blob)
                containerd.ingest(tmp_path / f"{name}.tar.gz", digest)
                layer = descriptor_pb2.Descriptor(
                    media_type="application/vnd.oci.image.layer.v1.tar+gzip",
                    digest=digest,
                    size=len(blob),
                )
                mounts = stub.Prepare(
                    pb.PrepareSnapshotRequest(key=f"default/1/extract-{name}"),
                    metadata=header,
                    timeout=DEADLINE,
                ).mounts
                snapshot_dir = Path(mounts[0].source).parent
                request = diff_pb2.ApplyRequest(diff=layer, mounts=mounts)
                if refusal is None:
                    differ.Apply(request, metadata=header, timeout=DEADLINE)
                    assert (snapshot_dir / "layer.erofs").is_file()
                    continue
                with pytest.raises(grpc.RpcError) as err:
                    differ.Apply(request, metadata=header, timeout=DEADLINE)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
                assert refusal in err.value.details() and "\n" not in err.value.details()
                assert leftovers(snapshot_dir) == [] and not (snapshot_dir / "layer.erofs").exists()
                info = stub.Stat(
                    pb.StatSnapshotRequest(key=f"default/1/extract-{name}"),
                    metadata=header,
                    timeout=DEADLINE,
                ).info
                assert info.kind == pb.ACTIVE
    finally:
        if service.proc is not None and service.proc.poll() is None:
            service.stop()
        containerd.stop()
        unmount_under(tmp_path)
