"""Incremental fsmeta: a merge that continues from a parent chain's fsmeta (applying only the
layers above it) writes the same bytes as a merge of every layer from scratch, and one that
cannot continue exactly falls back to merging from scratch."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from snapshotter.fsmeta.merge import LayerBlob, merge_layers
from tests.support.erofs_utils_oracle import OracleUnavailable, erofs_utils
from tests.support.helpers import mounted_fsmeta, overlay_of, require_root
from tests.support.layers import IMAGE_LAYERS, Entry, build_layers, write_tar
from tests.support.treecompare import diff_views, hardlink_groups, tree_view

# Above IMAGE_LAYERS: mtimes that differ (the build time is the most common one of the result,
# so which layer's inodes survive decides it), devices, fifos, xattrs shared by several
# inodes, a hardlink broken by a later layer, a directory replaced by a file and back.
MORE_LAYERS = [
    [
        Entry("dev", "dir", mtime=1_600_000_000),
        Entry("dev/null", "chr", dev=(1, 3), mtime=1_600_000_000),
        Entry("dev/sda", "blk", dev=(8, 0), mtime=1_600_000_000),
        Entry("dev/fifo", "fifo", mtime=1_600_000_000),
        *[
            Entry(f"many/f{i}", data=b"m" * i, mtime=1_600_000_000, xattrs={"user.tag": b"t"})
            for i in range(40)
        ],
        Entry("links/l4", data=b"4" * 3000),
        Entry("links/l5", "hardlink", link="links/l4"),
        Entry("links/l6", "hardlink", link="links/l4"),
        Entry("etc/sub", data=b"a file now", mtime="1600000000.5"),
    ],
    [
        Entry("many/.wh.f3"),
        Entry("many/f4", data=b"over" * 3000, mtime=1_500_000_000),
        Entry("links/l4", data=b"broken away"),
        Entry("etc/sub", "dir"),
        Entry("etc/sub/again", data=b"x" * 70000, mtime=1_500_000_000),
        Entry("dev/.wh..wh..opq"),
        Entry("dev/zero", "chr", dev=(1, 5), mtime=1_500_000_000),
    ],
]


def test_continued_merge_is_byte_identical(tmp_path: Path) -> None:
    layers = build_layers(tmp_path, IMAGE_LAYERS + MORE_LAYERS)
    full = tmp_path / "full.fsmeta"
    scratch = merge_layers(layers, full, verity=True)
    for k in range(1, len(layers)):
        parent = tmp_path / f"parent{k}.fsmeta"
        merge_layers(layers[:k], parent, verity=True)
        said: list[str] = []
        out = tmp_path / f"continued{k}.fsmeta"
        result = merge_layers(layers, out, verity=True, parent=parent, progress=said.append)
        assert f"layers 1-{k} from {parent}" in said, "the parent was not continued from"
        assert not any(f"layer {i}/" in step for step in said for i in range(1, k + 1))
        assert out.read_bytes() == full.read_bytes(), f"continuing from {k} layers differs"
        assert result.verity.root_hash == scratch.verity.root_hash
        assert result.entries == scratch.entries


def test_continued_merge_mounts_as_overlayfs(tmp_path: Path) -> None:
    require_root()
    layers = build_layers(tmp_path, IMAGE_LAYERS + MORE_LAYERS)
    merge_layers(layers[:3], tmp_path / "parent.fsmeta")
    merge_layers(layers, tmp_path / "m.fsmeta", parent=tmp_path / "parent.fsmeta")
    with overlay_of(layers) as ovl:
        want, want_links = tree_view(ovl), hardlink_groups(ovl)
    with mounted_fsmeta(tmp_path / "m.fsmeta", layers) as mnt:
        assert diff_views(tree_view(mnt), want) == []
        assert hardlink_groups(mnt) == want_links


def test_parent_of_other_layers_is_not_continued(tmp_path: Path) -> None:
    layers = build_layers(tmp_path, IMAGE_LAYERS)
    merge_layers(layers, tmp_path / "full.fsmeta")
    # The parent's device table must be these layers' first k, in order, with their tags.
    swapped = tmp_path / "swapped.fsmeta"
    merge_layers([layers[1], layers[0]], swapped)
    tagged = tmp_path / "tagged.fsmeta"
    merge_layers([LayerBlob(layers[0], tag="other")], tagged)
    for parent in (swapped, tagged, tmp_path / "missing.fsmeta", layers[0]):
        said: list[str] = []
        out = tmp_path / "out.fsmeta"
        merge_layers(layers, out, parent=parent, progress=said.append)
        assert not any(" from " in step for step in said), parent
        assert out.read_bytes() == (tmp_path / "full.fsmeta").read_bytes()


def test_parent_holding_data_is_merged_from_scratch(tmp_path: Path) -> None:
    """mkfs.erofs stores file tails inline; the merge copies such a tail into the fsmeta's
    own blocks, which the tree alone does not say: such a parent is not continued."""
    try:
        oracle = erofs_utils()
    except OracleUnavailable as exc:
        pytest.skip(str(exc))
    tar = write_tar(tmp_path / "t.tar", [Entry("./", "dir"), Entry("tail", data=b"t" * 5000)])
    theirs = tmp_path / "theirs.erofs"
    subprocess.run([oracle.mkfs, "--quiet", "--tar=f", "--aufs", str(theirs), str(tar)], check=True)
    layers = [theirs, *build_layers(tmp_path, IMAGE_LAYERS[:2])]
    merge_layers(layers, tmp_path / "full.fsmeta")
    merge_layers(layers[:1], tmp_path / "parent.fsmeta")
    said: list[str] = []
    merge_layers(
        layers, tmp_path / "out.fsmeta", parent=tmp_path / "parent.fsmeta", progress=said.append
    )
    assert not any(" from " in step for step in said)
    assert (tmp_path / "out.fsmeta").read_bytes() == (tmp_path / "full.fsmeta").read_bytes()
