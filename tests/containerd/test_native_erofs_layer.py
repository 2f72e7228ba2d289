"""Native EROFS layers (application/vnd.erofs.layer.v1) through our differ: read from a real
containerd's content store, stored as they are with a verity tree, refused when they are not
what the descriptor says; a tar layer and the EROFS image it converted to, applied each way,
get the same verity root."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from shim_integration.testbed.containerd_dist import from_suite
from shim_integration.testbed.containerd_private import Stack
from snapshotter.fsmeta.merge import merge_layers
from snapshotter.ingest.convert import convert_layer, import_erofs_image
from snapshotter.service.api.containerd.services.diff.v1 import diff_pb2, diff_pb2_grpc
from snapshotter.service.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter.service.api.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from snapshotter.service.api.containerd.types import descriptor_pb2
from snapshotter.service.diff_service import EROFS_LAYER, NATIVE_EROFS_LAYERS
from tests.support.erofs_utils_oracle import OracleUnavailable, erofs_utils
from tests.support.helpers import mounted_erofs, require_root, require_tool
from tests.support.layers import Entry, awkward_entries, compress, write_tar
from tests.support.treecompare import diff_views, tree_view

NS = [("containerd-namespace", "default")]
LABEL = "containerd.io/snapshot/erofs."


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    require_root()
    base = Path(tempfile.mkdtemp(prefix="ctd-native-"))
    running = Stack(from_suite("trixie"), base, differ=True).start()
    yield running
    running.stop()
    shutil.rmtree(base, ignore_errors=True)


def _apply(
    stack: Stack, key: str, digest: str, size: int, media_type: str = EROFS_LAYER
) -> tuple[grpc.StatusCode, object]:
    with grpc.insecure_channel(f"unix:{stack.service.socket}") as channel:
        snapshots = pb_grpc.SnapshotsStub(channel)
        mounts = snapshots.Prepare(pb.PrepareSnapshotRequest(key=key)).mounts
        differ = diff_pb2_grpc.DiffStub(channel)
        request = diff_pb2.ApplyRequest(
            diff=descriptor_pb2.Descriptor(media_type=media_type, digest=digest, size=size),
            mounts=mounts,
        )
        try:
            return grpc.StatusCode.OK, differ.Apply(request, metadata=NS)
        except grpc.RpcError as exc:
            return exc.code(), exc.details()


def test_native_erofs_layer_is_stored_as_it_is(stack: Stack, tmp_path: Path) -> None:
    veritysetup = require_tool("veritysetup")
    layer = tmp_path / "native.erofs"
    convert_layer(
        write_tar(tmp_path / "l.tar", [Entry("./", "dir"), Entry("etc/os", data=b"native\n")]),
        layer,
    )
    blob = layer.read_bytes()
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    stack.containerd.ingest(layer, digest)
    code, reply = _apply(stack, "default/1/extract-native", digest, len(blob))
    assert code == grpc.StatusCode.OK, reply
    assert reply.applied.digest == digest and reply.applied.media_type == EROFS_LAYER
    with grpc.insecure_channel(f"unix:{stack.service.socket}") as channel:
        snapshots = pb_grpc.SnapshotsStub(channel)
        snapshots.Commit(
            pb.CommitSnapshotRequest(key="default/1/extract-native", name="default/1/native")
        )
        labels = snapshots.Stat(pb.StatSnapshotRequest(key="default/1/native")).info.labels
    stored = next(stack.base.glob("erofs-py/snapshots/*/layer.erofs"))
    assert stored.read_bytes()[: len(blob)] == blob
    prefix = "containerd.io/snapshot/erofs."
    proc = subprocess.run(
        [
            veritysetup,
            "verify",
            str(stored),
            str(stored),
            labels[prefix + "verity.root-hash"],
            f"--hash-offset={labels[prefix + 'verity.hash-offset']}",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    with mounted_erofs(stored) as got, mounted_erofs(layer) as want:
        assert diff_views(tree_view(got), tree_view(want)) == []


def _apply_and_commit(stack: Stack, key: str, blob: Path, media_type: str) -> dict[str, str]:
    """BLOB applied by the differ into a new snapshot KEY, committed; its labels."""
    digest = "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest()
    stack.containerd.ingest(blob, digest)
    code, reply = _apply(stack, f"{key}-extract", digest, blob.stat().st_size, media_type)
    assert code == grpc.StatusCode.OK, reply
    with grpc.insecure_channel(f"unix:{stack.service.socket}") as channel:
        snapshots = pb_grpc.SnapshotsStub(channel)
        snapshots.Commit(pb.CommitSnapshotRequest(key=f"{key}-extract", name=key))
        return dict(snapshots.Stat(pb.StatSnapshotRequest(key=key)).info.labels)


def test_tar_layer_and_its_erofs_image_get_one_root(stack: Stack, tmp_path: Path) -> None:
    """The node's differ converts a gzip tar layer; the EROFS image it stored (the tree cut
    off at the hash offset, what `publish --layers` pushes) applied again as a native layer,
    under either media type, gets the same salt and the same verity root."""
    tar = write_tar(
        tmp_path / "l.tar",
        [
            Entry("./", "dir"),
            Entry("etc/os", data=b"one\n"),
            Entry("usr/big", data=bytes(range(256)) * 900),
        ],
    )
    converted = _apply_and_commit(
        stack, "default/3/tar", compress(tar, "gzip"), "application/vnd.oci.image.layer.v1.tar+gzip"
    )
    stored = (
        next(
            p
            for p in stack.base.glob("erofs-py/snapshots/*/layer.json")
            if converted[LABEL + "blob.digest"] in p.read_text()
        ).parent
        / "layer.erofs"
    )
    image = tmp_path / "image.erofs"
    image.write_bytes(stored.read_bytes()[: int(converted[LABEL + "blob.size"])])
    for i, media_type in enumerate(sorted(NATIVE_EROFS_LAYERS)):
        native = _apply_and_commit(stack, f"default/3/native{i}", image, media_type)
        assert native[LABEL + "blob.digest"] == converted[LABEL + "blob.digest"]
        for name in ("verity.salt", "verity.root-hash", "verity.hash-offset"):
            assert native[LABEL + name] == converted[LABEL + name], (media_type, name)
        assert native[LABEL + "diff-id"] != converted[LABEL + "diff-id"]


@pytest.mark.parametrize("damage", ["not-erofs", "wrong-digest", "name-with-slash"])
def test_bad_native_layers_are_refused(stack: Stack, tmp_path: Path, damage: str) -> None:
    blob = tmp_path / "bad.erofs"
    if damage == "name-with-slash":  # a real image whose etc/hostname is named host/ame
        convert_layer(
            write_tar(tmp_path / "l.tar", [Entry("./", "dir"), Entry("etc/hostname", data=b"box")]),
            blob,
        )
        image = blob.read_bytes()
        blob.write_bytes(image.replace(b"hostname", b"host/ame", 1))
    else:
        blob.write_bytes(b"not an erofs image " * 500)
    size = blob.stat().st_size
    digest = "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest()
    stack.containerd.ingest(blob, digest)
    claimed = "sha256:" + "0" * 64 if damage == "wrong-digest" else digest
    code, details = _apply(stack, f"default/2/extract-{damage}", claimed, size)
    assert code != grpc.StatusCode.OK
    if damage == "wrong-digest":
        assert code == grpc.StatusCode.NOT_FOUND
    elif damage == "not-erofs":
        assert "EROFS" in details
    else:
        assert "/etc (nid" in details and "invalid file name b'host/ame'" in details, details
        assert "\n" not in details and "Traceback" not in details
        # nothing of the refused layer was kept
        assert not list(stack.base.glob("erofs-py/snapshots/*/.*.tmp"))


# -- no false refusals: what other tools write is accepted, merges and mounts the same --------


def _source_tree(root: Path) -> Path:
    """A directory with what layers hold: small and large files, a sparse one, long names,
    a directory of several blocks, hardlinks, symlinks, a device, a FIFO and xattrs."""
    root.mkdir()
    (root / "etc").mkdir()
    (root / "etc/hostname").write_bytes(b"box\n")
    (root / "bin").mkdir()
    (root / "bin/tool").write_bytes(bytes(range(256)) * 300)
    os.link(root / "bin/tool", root / "bin/tool-link")
    os.symlink("/bin/busybox", root / "bin/sh")
    os.symlink("x/" * 600 + "end", root / "bin/longlink")
    with open(root / "sparse", "wb") as f:
        f.write(b"a")
        f.seek(1 << 20)
        f.write(b"z")
    many = root / "many"
    many.mkdir()
    for i in range(400):
        (many / f"entry-{i:04d}-{'n' * (i % 60)}").write_bytes(b"%d\n" % i)
    (root / ("f" * 200)).write_bytes(b"long name")  # 1.5 fails on 255
    os.mkfifo(root / "fifo")
    os.mknod(root / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.setxattr(root / "etc/hostname", "user.comment", b"hello")
    os.setxattr(root / "bin/tool", "user.comment", b"hello")
    os.setxattr(root / "etc", "trusted.dirattr", b"on dir")
    return root


def _accepted_and_merged_equal(image: Path, tmp_path: Path) -> None:
    """Import keeps the image, and its fsmeta merge mounts equal to the image itself."""
    stored = tmp_path / "stored.erofs"
    with open(image, "rb") as f:
        result = import_erofs_image(f, stored)
    assert stored.read_bytes()[: image.stat().st_size] == image.read_bytes()
    merged = merge_layers([stored], tmp_path / "m.fsmeta")
    with mounted_erofs(image) as want, mounted_erofs(merged.fsmeta, [stored]) as got:
        assert diff_views(tree_view(got), tree_view(want)) == []
        assert result.entries == len([p for p in want.rglob("*")])


@pytest.mark.parametrize(
    "options", ["", "-Enoinline_data", "-Eforce-inode-extended", "-Enosbcrc", "--chunksize=8192"]
)
def test_mkfs_erofs_1_5_images_are_accepted(tmp_path: Path, options: str) -> None:
    """Debian's mkfs.erofs 1.5 (superblock checksum on by default, tail packing, compact and
    extended inodes, chunk-based files): never refused by the validation."""
    require_root()
    mkfs = require_tool("mkfs.erofs")
    image = tmp_path / "theirs.erofs"
    proc = subprocess.run(
        [mkfs, "--quiet", *options.split(), str(image), str(_source_tree(tmp_path / "src"))],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    _accepted_and_merged_equal(image, tmp_path)


@pytest.mark.parametrize(
    "options", ["", "-b 512", "--chunksize=65536", "-Ededupe", "--tar=f --aufs"]
)
def test_mkfs_erofs_1_8_images_are_accepted(tmp_path: Path, options: str) -> None:
    """erofs-utils 1.8 (built from trixie's source by tests/support/erofs_utils_oracle.py), from a
    directory, also with 512-byte blocks and chunk-based files, and from a tar."""
    require_root()
    try:
        oracle = erofs_utils()
    except OracleUnavailable as exc:
        pytest.skip(str(exc))
    image = tmp_path / "theirs.erofs"
    if options.startswith("--tar"):
        source = write_tar(tmp_path / "layer.tar", awkward_entries())
    else:
        source = _source_tree(tmp_path / "src")
    proc = subprocess.run(
        [oracle.mkfs, "--quiet", *options.split(), str(image), str(source)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    _accepted_and_merged_equal(image, tmp_path)
