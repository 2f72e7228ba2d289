"""Native EROFS layers (application/vnd.erofs.layer.v1) through our differ: read from a real
containerd's content store, stored as they are with a verity tree, refused when they are not
what the descriptor says."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from shim_integration.containerd_dist import from_suite
from shim_integration.containerd_private import Stack
from snapshotter.api.containerd.services.diff.v1 import diff_pb2, diff_pb2_grpc
from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from snapshotter.api.containerd.types import descriptor_pb2
from snapshotter.diff_service import EROFS_LAYER
from snapshotter.erofs import convert_layer
from tests.helpers import mounted_erofs, require_root, require_tool
from tests.layers import Entry, write_tar
from tests.treecompare import diff_views, tree_view

NS = [("containerd-namespace", "default")]


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    require_root()
    base = Path(tempfile.mkdtemp(prefix="ctd-native-"))
    running = Stack(from_suite("trixie"), base, differ=True).start()
    # containerd collects garbage once shortly after it starts (its GC scheduler's startup
    # delay). Run that collection now, synchronously, so it cannot land between an ingest and
    # the label that keeps the ingested blob.
    running.containerd.ctr("leases", "create", "--id", "gc-now")
    running.containerd.ctr("leases", "delete", "--sync", "gc-now")
    yield running
    running.stop()
    shutil.rmtree(base, ignore_errors=True)


def _ingest(stack: Stack, blob: Path, digest: str) -> None:
    ctr = stack.containerd
    with open(blob, "rb") as f:
        subprocess.run([ctr.dist.tool("ctr"), "--address", str(ctr.socket), "-n", "default",
                        "content", "ingest", "--expected-digest", digest,
                        "--expected-size", str(blob.stat().st_size), f"ingest-{digest[7:19]}"],
                       stdin=f, check=True, capture_output=True, env=ctr.env())
    # An ingested blob nothing refers to is garbage to containerd: root it, as a client would.
    ctr.ctr("content", "label", digest, "containerd.io/gc.root=test")


def _apply(stack: Stack, key: str, digest: str, size: int) -> tuple[grpc.StatusCode, object]:
    with grpc.insecure_channel(f"unix:{stack.service.socket}") as channel:
        snapshots = pb_grpc.SnapshotsStub(channel)
        mounts = snapshots.Prepare(pb.PrepareSnapshotRequest(key=key)).mounts
        differ = diff_pb2_grpc.DiffStub(channel)
        request = diff_pb2.ApplyRequest(
            diff=descriptor_pb2.Descriptor(media_type=EROFS_LAYER, digest=digest, size=size),
            mounts=mounts)
        try:
            return grpc.StatusCode.OK, differ.Apply(request, metadata=NS)
        except grpc.RpcError as exc:
            return exc.code(), exc.details()


def test_native_erofs_layer_is_stored_as_it_is(stack: Stack, tmp_path: Path) -> None:
    veritysetup = require_tool("veritysetup")
    layer = tmp_path / "native.erofs"
    convert_layer(write_tar(tmp_path / "l.tar", [Entry("./", "dir"),
                                                 Entry("etc/os", data=b"native\n")]), layer)
    blob = layer.read_bytes()
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    _ingest(stack, layer, digest)
    code, reply = _apply(stack, "default/1/extract-native", digest, len(blob))
    assert code == grpc.StatusCode.OK, reply
    assert reply.applied.digest == digest and reply.applied.media_type == EROFS_LAYER
    with grpc.insecure_channel(f"unix:{stack.service.socket}") as channel:
        snapshots = pb_grpc.SnapshotsStub(channel)
        snapshots.Commit(pb.CommitSnapshotRequest(key="default/1/extract-native",
                                                  name="default/1/native"))
        labels = snapshots.Stat(pb.StatSnapshotRequest(key="default/1/native")).info.labels
    stored = next(stack.base.glob("erofs-py/snapshots/*/layer.erofs"))
    assert stored.read_bytes()[: len(blob)] == blob
    prefix = "containerd.io/snapshot/erofs."
    proc = subprocess.run([veritysetup, "verify", str(stored), str(stored),
                           labels[prefix + "verity.root-hash"],
                           f"--hash-offset={labels[prefix + 'verity.hash-offset']}"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    with mounted_erofs(stored) as got, mounted_erofs(layer) as want:
        assert diff_views(tree_view(got), tree_view(want)) == []


@pytest.mark.parametrize("damage", ["not-erofs", "wrong-digest"])
def test_bad_native_layers_are_refused(stack: Stack, tmp_path: Path, damage: str) -> None:
    blob = tmp_path / "bad.erofs"
    blob.write_bytes(b"not an erofs image " * 500)
    digest = "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest()
    _ingest(stack, blob, digest)
    claimed = digest if damage == "not-erofs" else "sha256:" + "0" * 64
    code, details = _apply(stack, f"default/2/extract-{damage}", claimed, 9500)
    assert code != grpc.StatusCode.OK
    assert ("EROFS" in details) if damage == "not-erofs" else code == grpc.StatusCode.NOT_FOUND
