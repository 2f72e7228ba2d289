"""Our service over its socket, as containerd's proxy client sees it: status codes, List
filters, Usage, Update, Cleanup of orphans, socket mode, health and SIGTERM shutdown."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2

from shim_integration.testbed.containerd_private import SnapshotterProcess, unmount_under
from snapshotter.service.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter.service.api.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from snapshotter.service.layout import MARKER, MARKER_TEXT
from tests.support.helpers import require_root

Code = grpc.StatusCode


@pytest.fixture
def service(tmp_path: Path) -> Iterator[SnapshotterProcess]:
    proc = SnapshotterProcess(tmp_path / "root", tmp_path / "sn.sock", tmp_path / "sn.log").start()
    yield proc
    if proc.proc is not None and proc.proc.poll() is None:
        proc.stop()
    unmount_under(tmp_path)


@pytest.fixture
def stub(service: SnapshotterProcess) -> Iterator[pb_grpc.SnapshotsStub]:
    with grpc.insecure_channel(f"unix:{service.socket}") as channel:
        yield pb_grpc.SnapshotsStub(channel)


def code_of(call, request) -> Code:
    with pytest.raises(grpc.RpcError) as err:
        call(request)
    return err.value.code()


def commit_layer(stub: pb_grpc.SnapshotsStub, root: Path, key: str, name: str) -> None:
    mounts = stub.Prepare(pb.PrepareSnapshotRequest(key=key)).mounts
    assert [m.type for m in mounts] == ["bind"]
    Path(mounts[0].source, "hello").write_text(f"{name}\n")
    stub.Commit(pb.CommitSnapshotRequest(key=key, name=name, labels={"l": "1"}))


def test_status_codes_are_containerds(stub: pb_grpc.SnapshotsStub, service) -> None:
    assert code_of(stub.Stat, pb.StatSnapshotRequest(key="ns/1/missing")) == Code.NOT_FOUND
    assert code_of(stub.Prepare, pb.PrepareSnapshotRequest(key="")) == Code.INVALID_ARGUMENT
    commit_layer(stub, service.root, "ns/1/a", "ns/2/A")
    assert code_of(stub.Prepare, pb.PrepareSnapshotRequest(key="ns/2/A")) == Code.ALREADY_EXISTS
    stub.View(pb.ViewSnapshotRequest(key="ns/3/v"))
    assert (
        code_of(stub.Commit, pb.CommitSnapshotRequest(key="ns/3/v", name="ns/4/V"))
        == Code.FAILED_PRECONDITION
    )
    assert code_of(stub.Mounts, pb.MountsRequest(key="ns/2/A")) == Code.FAILED_PRECONDITION
    assert (
        code_of(stub.Prepare, pb.PrepareSnapshotRequest(key="x", parent="ns/3/v"))
        == Code.INVALID_ARGUMENT
    )
    assert (
        code_of(stub.Prepare, pb.PrepareSnapshotRequest(key="x", parent="nope")) == Code.NOT_FOUND
    )
    bad = pb.UpdateSnapshotRequest(
        info=pb.Info(name="ns/2/A"), update_mask=field_mask_pb2.FieldMask(paths=["parent"])
    )
    assert code_of(stub.Update, bad) == Code.INVALID_ARGUMENT
    assert code_of(stub.Remove, pb.RemoveSnapshotRequest(key="ns/9/none")) == Code.NOT_FOUND


def test_chain_labels_usage_list_remove(stub: pb_grpc.SnapshotsStub, service) -> None:
    require_root()  # a child of a committed layer mounts the layer's EROFS image
    commit_layer(stub, service.root, "ns/1/a", "ns/2/A")
    info = stub.Stat(pb.StatSnapshotRequest(key="ns/2/A")).info
    assert info.kind == pb.COMMITTED and info.labels["l"] == "1"
    assert int(info.labels["containerd.io/snapshot/erofs.blob.size"]) > 0
    usage = stub.Usage(pb.UsageRequest(key="ns/2/A"))
    assert usage.inodes == 1 and usage.size > int(
        info.labels["containerd.io/snapshot/erofs.blob.size"]
    )  # blob + verity tree
    mounts = stub.Prepare(pb.PrepareSnapshotRequest(key="ns/3/b", parent="ns/2/A")).mounts
    assert mounts[0].type == "overlay"
    lower = next(o for o in mounts[0].options if o.startswith("lowerdir=")).split("=", 1)[1]
    assert Path(lower, "hello").read_text() == "ns/2/A\n"  # the mounted layer.erofs
    assert code_of(stub.Remove, pb.RemoveSnapshotRequest(key="ns/2/A")) == Code.FAILED_PRECONDITION
    listed = [
        i.name for r in stub.List(pb.ListSnapshotsRequest(filters=["kind==active"])) for i in r.info
    ]
    assert listed == ["ns/3/b"]
    updated = stub.Update(
        pb.UpdateSnapshotRequest(
            info=pb.Info(name="ns/2/A", labels={"new": "v"}),
            update_mask=field_mask_pb2.FieldMask(paths=["labels.new"]),
        )
    ).info
    assert updated.labels["new"] == "v" and updated.labels["l"] == "1"
    stub.Remove(pb.RemoveSnapshotRequest(key="ns/3/b"))
    stub.Remove(pb.RemoveSnapshotRequest(key="ns/2/A"))
    assert list(stub.List(pb.ListSnapshotsRequest())) == []
    assert sorted(p.name for p in (service.root / "snapshots").iterdir()) == []


def test_cleanup_removes_orphans(stub: pb_grpc.SnapshotsStub, service) -> None:
    commit_layer(stub, service.root, "ns/1/a", "ns/2/A")
    orphan = service.root / "snapshots" / "999"  # as a rolled-back Prepare leaves one
    (orphan / "fs").mkdir(parents=True)
    (orphan / MARKER).write_bytes(MARKER_TEXT)
    foreign = service.root / "snapshots" / "not-ours"  # no marker: never removed
    foreign.mkdir()
    stale = service.root / "snapshots" / "1" / ".layer-x.tmp"
    stale.write_bytes(b"half a blob")
    stub.Cleanup(pb.CleanupRequest())
    assert not orphan.exists() and not stale.exists()
    assert (service.root / "snapshots" / "1" / "layer.erofs").exists()
    assert foreign.is_dir()


def test_socket_health_and_sigterm(service: SnapshotterProcess) -> None:
    assert stat.S_IMODE(service.socket.stat().st_mode) == 0o600
    assert service.healthy()
    assert service.stop() == 0
    assert not service.socket.exists()
    log = service.log.read_text()
    assert '"msg": "serving"' in log and '"msg": "stopped"' in log
