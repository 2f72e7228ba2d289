"""containerd's per-layer dm-verity sidecar: every committed layer has `layer.erofs.dmverity`
beside `layer.erofs`, as containerd's erofs differ writes it (`internal/dmverity`
`FormatLayer`: `{"roothash": "<hex>", "hashoffset": <bytes>}` with Go's MarshalIndent, the
offset being where the v1 superblock is), so veritysetup (superblock mode, which is what
containerd's go-dmverity reads) verifies the blob with nothing but those two values. Both ways a
layer is stored: Commit's conversion and the differ's Apply (tar and native EROFS layers)."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import grpc
import pytest

from snapshotter.service import layer_build
from snapshotter.service.snapshots import Snapshotter
from snapshotter.verity import VerityInfo
from tests.support.helpers import require_root, require_tool
from tests.support.kata_readers import runtime_rs_sidecar
from tests.support.verity import veritysetup_verify

PREFIX = "containerd.io/snapshot/erofs."
DEADLINE = 60.0


def go_marshal_indent(roothash: str, hashoffset: int, salt: str | None = None) -> bytes:
    """What Go's `json.MarshalIndent(metadata, "", "  ")` writes for containerd's
    `DmverityMetadata` (fields in struct order, no trailing newline); SALT is our extra key."""
    text = f'{{\n  "roothash": "{roothash}",\n  "hashoffset": {hashoffset}'
    if salt is not None:
        text += f',\n  "salt": "{salt}"'
    return (text + "\n}").encode()


def check_sidecar(directory: Path, labels: dict[str, str], tmp_path: Path) -> dict:
    """The sidecar in DIRECTORY is containerd's, describes the labels' tree, verifies the blob,
    and stops verifying when one data byte changes."""
    blob, sidecar = directory / "layer.erofs", directory / "layer.erofs.dmverity"
    data = json.loads(sidecar.read_bytes())
    assert data["roothash"] == labels[PREFIX + "verity.root-hash"]
    assert data["hashoffset"] == int(labels[PREFIX + "verity.hash-offset"])
    salted = labels[PREFIX + "verity.salt"] != "-"
    assert sidecar.read_bytes() == go_marshal_indent(
        data["roothash"], data["hashoffset"], None if salted else "-"
    )
    assert blob.read_bytes()[data["hashoffset"] :][:8] == b"verity\0\0"  # v1 superblock there
    proc = veritysetup_verify(blob, sidecar=sidecar)
    assert proc.returncode == 0, proc.stderr
    flipped = tmp_path / f"flipped-{directory.name}.erofs"
    shutil.copyfile(blob, flipped)
    with open(flipped, "r+b") as f:
        where = random.Random(7).randrange(data["hashoffset"])  # a byte of the EROFS image
        f.seek(where)
        byte = f.read(1)
        f.seek(where)
        f.write(bytes([byte[0] ^ 0x01]))
    proc = veritysetup_verify(flipped, sidecar=sidecar)
    assert proc.returncode != 0, f"a flipped byte at {where} still verified"
    flipped.unlink()
    assert sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp")) == []
    return data


def _commit_layers(sn: Snapshotter, files: list[dict[str, bytes]]) -> list[tuple[Path, dict]]:
    out = []
    for n, content in enumerate(files):
        mounts = sn.prepare(f"ns/{n}/extract")
        for name, data in content.items():
            Path(mounts[0].source, name).write_bytes(data)
        sn.commit(f"ns/{n}/layer", f"ns/{n}/extract")
        sid = sn.store.get_info(f"ns/{n}/layer")[0]
        out.append((sn.layout.dir(sid), sn.stat(f"ns/{n}/layer").labels))
    return out


@pytest.mark.parametrize("kata_verity", [False, True], ids=["salted", "kata-unsalted"])
def test_every_committed_layer_has_a_sidecar_veritysetup_verifies(
    tmp_path: Path, kata_verity: bool
) -> None:
    """Commit's conversion (layer_build.publish_layer): an empty layer, a small one, one of
    several data blocks. Unsalted trees (kata_verity) say `"salt": "-"` as runtime-rs needs."""
    require_tool("veritysetup")
    rng = random.Random(14)
    sn = Snapshotter(tmp_path / "root", kata_verity=kata_verity)
    try:
        layers = _commit_layers(
            sn, [{}, {"etc-os": b"sidecar\n"}, {"big": rng.randbytes(300_000), "small": b"x"}]
        )
    finally:
        sn.close()
    for directory, labels in layers:
        data = check_sidecar(directory, labels, tmp_path)
        assert ("salt" in data) == kata_verity


def test_unsalted_sidecar_gives_runtime_rs_the_table_that_verifies(tmp_path: Path) -> None:
    """Kata runtime-rs' erofs path reads our sidecar (its rules: tests/support/kata_readers.py
    `runtime_rs_sidecar`) and gets a table that verifies the blob, for both tree kinds."""
    require_tool("veritysetup")
    for kata_verity in (False, True):
        sn = Snapshotter(tmp_path / f"root-{kata_verity}", kata_verity=kata_verity)
        try:
            [(directory, _labels)] = _commit_layers(sn, [{"f": b"runtime-rs\n" * 1000}])
        finally:
            sn.close()
        table = runtime_rs_sidecar(
            directory / "layer.erofs", json.loads((directory / "layer.erofs.dmverity").read_bytes())
        )
        proc = veritysetup_verify(directory / "layer.erofs", table=table)
        assert proc.returncode == 0, (kata_verity, table, proc.stderr)


def test_sidecar_is_written_before_layer_json(tmp_path: Path, monkeypatch) -> None:
    """layer_build's crash rule: if layer.json exists, so does everything it describes. A
    sidecar that cannot be written leaves no layer.json (the layer is redone), and
    republishing removes an older sidecar before the blob it describes."""
    require_tool("veritysetup")
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"one\n")
    directory = tmp_path / "snap"
    directory.mkdir()
    first = layer_build.publish_layer(
        directory, lambda out: layer_build.convert_directory(src, out)
    )
    assert (
        json.loads((directory / "layer.erofs.dmverity").read_bytes())["roothash"] == first.root_hash
    )

    def refuse(self: VerityInfo, blob_path: object) -> Path:
        raise OSError(28, "No space left on device", str(blob_path) + ".dmverity")

    monkeypatch.setattr(VerityInfo, "write_containerd_sidecar", refuse)
    (src / "f").write_bytes(b"two\n")
    with pytest.raises(OSError):
        layer_build.publish_layer(directory, lambda out: layer_build.convert_directory(src, out))
    assert layer_build.read_layer(directory) is None
    assert not (directory / "layer.erofs.dmverity").exists()  # the old one went first
    monkeypatch.undo()
    second = layer_build.publish_layer(
        directory, lambda out: layer_build.convert_directory(src, out)
    )
    assert second.root_hash != first.root_hash
    assert (
        json.loads((directory / "layer.erofs.dmverity").read_bytes())["roothash"]
        == second.root_hash
    )


def test_apply_stores_a_sidecar_for_tar_and_native_layers(tmp_path: Path) -> None:
    """The differ's Apply with the blobs in a real containerd's content store: a gzip tar
    layer and a native EROFS layer, each committed, each with its verifying sidecar."""
    from shim_integration.testbed.containerd_private import (
        Containerd,
        SnapshotterProcess,
        system_dist,
        unmount_under,
    )
    from snapshotter.ingest.convert import convert_layer
    from snapshotter.service.api.containerd.services.diff.v1 import diff_pb2, diff_pb2_grpc
    from snapshotter.service.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
    from snapshotter.service.api.containerd.services.snapshots.v1 import (
        snapshots_pb2_grpc as pb_grpc,
    )
    from snapshotter.service.api.containerd.types import descriptor_pb2
    from snapshotter.service.diff_service import EROFS_LAYER
    from tests.support.layers import Entry, gzip_tar, write_tar

    require_root()
    require_tool("containerd")
    require_tool("veritysetup")
    native = tmp_path / "native.erofs"
    convert_layer(
        write_tar(tmp_path / "n.tar", [Entry("./", "dir"), Entry("etc/os", data=b"native\n")]),
        native,
    )
    blobs = {
        "tar": (
            gzip_tar({"a": b"a\n", "b": random.Random(3).randbytes(200_000)}),
            "application/vnd.oci.image.layer.v1.tar+gzip",
        ),
        "native": (native.read_bytes(), EROFS_LAYER),
    }
    service_sock = tmp_path / "sn.sock"
    containerd = Containerd(system_dist(), tmp_path / "containerd", service_sock).start()
    service = SnapshotterProcess(
        tmp_path / "root",
        service_sock,
        tmp_path / "sn.log",
        extra=["--containerd-address", str(containerd.socket)],
    )
    header = (("containerd-namespace", "default"),)
    try:
        service.start()
        with grpc.insecure_channel(f"unix:{service_sock}") as channel:
            snapshots = pb_grpc.SnapshotsStub(channel)
            differ = diff_pb2_grpc.DiffStub(channel)
            for name, (blob, media_type) in blobs.items():
                digest = "sha256:" + hashlib.sha256(blob).hexdigest()
                (tmp_path / f"{name}.blob").write_bytes(blob)
                containerd.ingest(tmp_path / f"{name}.blob", digest)
                key = f"default/1/extract-{name}"
                mounts = snapshots.Prepare(
                    pb.PrepareSnapshotRequest(key=key), metadata=header, timeout=DEADLINE
                ).mounts
                directory = Path(mounts[0].source).parent
                differ.Apply(
                    diff_pb2.ApplyRequest(
                        diff=descriptor_pb2.Descriptor(
                            media_type=media_type, digest=digest, size=len(blob)
                        ),
                        mounts=mounts,
                    ),
                    metadata=header,
                    timeout=DEADLINE,
                )
                snapshots.Commit(
                    pb.CommitSnapshotRequest(key=key, name=f"default/1/{name}"),
                    metadata=header,
                    timeout=DEADLINE,
                )
                labels = dict(
                    snapshots.Stat(
                        pb.StatSnapshotRequest(key=f"default/1/{name}"),
                        metadata=header,
                        timeout=DEADLINE,
                    ).info.labels
                )
                check_sidecar(directory, labels, tmp_path)
                if name == "native":  # stored as it is: the sidecar's data is the blob
                    assert (directory / "layer.erofs").read_bytes()[: len(blob)] == blob
    finally:
        if service.proc is not None and service.proc.poll() is None:
            service.stop()
        containerd.stop()
        unmount_under(tmp_path)


def test_a_layer_stored_before_sidecars_gets_one_from_its_layer_json(tmp_path: Path) -> None:
    """Layers published by an older version have no sidecar; `ensure_sidecar` writes the one
    publish_layer would have written, from layer.json, and leaves an existing one alone."""
    require_tool("veritysetup")
    sn = Snapshotter(tmp_path / "root")
    try:
        [(directory, labels)] = _commit_layers(sn, [{"f": b"old\n"}])
    finally:
        sn.close()
    sidecar = directory / "layer.erofs.dmverity"
    written = sidecar.read_bytes()
    sidecar.unlink()
    meta = layer_build.read_layer(directory)
    assert meta is not None
    assert layer_build.ensure_sidecar(directory, meta) == sidecar
    assert sidecar.read_bytes() == written
    check_sidecar(directory, labels, tmp_path)
