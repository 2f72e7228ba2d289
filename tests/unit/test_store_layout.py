"""The snapshot layout's crash and concurrency rules, in process (no containerd, no mounts)."""

from __future__ import annotations

from pathlib import Path

import pytest

from snapshotter.service import layer_build
from snapshotter.service.snapshots import Snapshotter
from tests.support.converters import SwappableConverter


@pytest.fixture
def converter() -> SwappableConverter:
    return SwappableConverter()


@pytest.fixture
def sn(tmp_path: Path, converter: SwappableConverter) -> Snapshotter:
    s = Snapshotter(tmp_path / "root", convert=converter)
    yield s
    s.close()


def test_cleanup_during_commit_keeps_the_conversion(
    sn: Snapshotter, converter: SwappableConverter
) -> None:
    """containerd's GC may call Cleanup while a Commit converts: the temp blob must survive."""
    mounts = sn.prepare("ns/1/a")
    Path(mounts[0].source, "f").write_text("data\n")
    removed_during: list[Path] = []

    def convert(src: Path, out: Path) -> layer_build.LayerMeta:
        meta = layer_build.convert_directory(src, out)
        removed_during.extend(sn.cleanup())
        assert out.exists()
        return meta

    converter.hook = convert
    sn.commit("ns/2/A", "ns/1/a")
    assert removed_during == []
    assert sn.stat("ns/2/A").labels["containerd.io/snapshot/erofs.blob.size"]


def test_leftovers_of_an_interrupted_commit_are_reused_or_removed(
    sn: Snapshotter, converter: SwappableConverter
) -> None:
    mounts = sn.prepare("ns/1/a")
    Path(mounts[0].source, "f").write_text("data\n")
    sid = sn.store.get_info("ns/1/a")[0]
    directory = sn.layout.dir(sid)
    # A Commit killed after publishing the layer but before its transaction:
    meta = layer_build.publish_layer(
        directory, lambda out: layer_build.convert_directory(sn.layout.fs(sid), out)
    )
    (directory / ".layer-dead.tmp").write_bytes(b"a killed conversion")
    assert [p.name for p in sn.cleanup()] == [".layer-dead.tmp"]
    converter.hook = lambda src, out: pytest.fail("the published layer should be reused")
    sn.commit("ns/2/A", "ns/1/a")
    assert (
        sn.stat("ns/2/A").labels["containerd.io/snapshot/erofs.verity.root-hash"] == meta.root_hash
    )
    assert list(sn.layout.fs(sid).iterdir()) == []  # the unpacked upper is gone


def test_layer_json_without_blob_is_not_a_layer(tmp_path: Path) -> None:
    (tmp_path / layer_build.META).write_text("{}")
    assert layer_build.read_layer(tmp_path) is None


def test_commit_removes_the_unpacked_upper_in_the_background(sn: Snapshotter) -> None:
    mounts = sn.prepare("ns/1/a")
    for i in range(200):
        Path(mounts[0].source, f"f{i}").write_text(f"{i}\n")
    sid = sn.store.get_info("ns/1/a")[0]
    sn.commit("ns/2/A", "ns/1/a")
    assert list(sn.layout.fs(sid).iterdir()) == []  # the mountpoint is empty at once
    assert sn.layout.wait_removals(timeout=120)
    assert sorted(p.name for p in sn.layout.dir(sid).iterdir()) == sorted(
        [".erofs-passthrough", "fs", "layer.erofs", "layer.erofs.dmverity", "layer.json"]
    )
    # a retired upper a crash left is removed by the next start's cleanup
    old = sn.layout.dir(sid) / "fs.old-deadbeef"
    (old / "d").mkdir(parents=True)
    assert [p.name for p in sn.cleanup()] == ["fs.old-deadbeef"]
