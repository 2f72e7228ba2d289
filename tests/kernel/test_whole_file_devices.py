"""Device tables that address whole files: device N starts where the whole file of device N-1
ends (blob plus its appended dm-verity tree, after the fsmeta's file with its own tree), so
joining the fsmeta and the layer files whole, in device order, as Kata's fsmerge mode and
`mkfs.erofs --vmdk-desc` users do, is itself a valid flat image. Judged by the host kernel
mounting that concatenation (and the `device=` mount, and `merge --flat`) against overlayfs
over the same layers."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from snapshotter.erofs.reader import ErofsImage
from snapshotter.fsmeta.merge import merge_layers
from snapshotter.service.snapshots import Snapshotter
from snapshotter.service.vm_mode import VM_MODE_LABEL
from snapshotter.verity import KATA_VERITY
from tests.support.cli import run_cli
from tests.support.helpers import (
    mounted_erofs,
    mounted_fsmeta,
    overlay_of,
    require_root,
    require_tool,
    unmount_below,
)
from tests.support.layers import IMAGE_LAYERS, Entry, build_layers
from tests.support.treecompare import diff_views, hardlink_groups, tree_view
from tests.support.vm_mode import commit_chain

# Every layer holds files of several sizes, each named after its layer, so a device read at
# the wrong offset shows as wrong bytes in many files (the old table read 2 of 7 wrong).
EXTRA_LAYERS = [
    [
        Entry(f"l{n}", "dir"),
        *[Entry(f"l{n}/f{size}", data=bytes([65 + n]) * size) for size in (600, 5000, 70000)],
        Entry("shared", data=b"top is %d" % n * 700),
    ]
    for n in range(4)
]


def _cat(files: list[Path], out: Path) -> None:
    """What Kata's fsmerge does with the files: join them whole, in device order."""
    with open(out, "wb") as sink:
        subprocess.run(["cat", *map(str, files)], stdout=sink, check=True)


def test_cat_of_the_whole_files_mounts_as_the_overlay(tmp_path: Path) -> None:
    require_root()
    layers = build_layers(tmp_path, IMAGE_LAYERS + EXTRA_LAYERS)
    fsmeta, flat = tmp_path / "image.fsmeta", tmp_path / "image.flat"
    result = merge_layers(layers, fsmeta, verity=True, flat_path=flat)
    # The point of the test: every file carries a tree after its image.
    assert fsmeta.stat().st_size > result.size
    assert all(p.stat().st_size > ErofsImage(p).sb.blocks * 4096 for p in layers)
    joined = tmp_path / "joined.img"
    _cat([fsmeta, *layers], joined)
    assert result.concatenable
    # `merge --flat` is exactly that concatenation (its own verity tree comes after it).
    assert result.flat_size == joined.stat().st_size
    with open(flat, "rb") as f:
        assert f.read(result.flat_size) == joined.read_bytes()
    with overlay_of(layers) as ovl:
        want = tree_view(ovl)
        want_links = hardlink_groups(ovl)
    assert "l3/f70000" in want and "etc/a" in want
    with mounted_erofs(joined) as mnt:  # one device, no options (Linux >= 6.3)
        assert diff_views(tree_view(mnt), want) == []
        assert hardlink_groups(mnt) == want_links
        assert (mnt / "l2" / "f70000").read_bytes() == b"C" * 70000
    with mounted_erofs(fsmeta, layers) as mnt:  # each blob file, tree and all, a `device=`
        assert diff_views(tree_view(mnt), want) == []
    with mounted_fsmeta(fsmeta, layers) as mnt:  # the same through fsconfig
        assert diff_views(tree_view(mnt), want) == []


def test_fsmeta_tree_is_counted_before_it_is_built(tmp_path: Path) -> None:
    """The fsmeta's own tree is appended after its image is written; its size follows from
    the image's size and the geometry, so device 1 starts right after it, and the fsmeta
    with its tree still verifies."""
    veritysetup = require_tool("veritysetup")
    layers = build_layers(tmp_path, EXTRA_LAYERS[:2])
    for verity, name in ((True, "salted"), (KATA_VERITY, "kata"), (False, "none")):
        fsmeta = tmp_path / f"{name}.fsmeta"
        result = merge_layers(layers, fsmeta, verity=verity)
        with ErofsImage(fsmeta) as img:
            slots = img.device_slots
        assert result.file_size == fsmeta.stat().st_size
        assert slots[0].uniaddr * 4096 == fsmeta.stat().st_size
        assert slots[1].uniaddr * 4096 == fsmeta.stat().st_size + layers[0].stat().st_size
        if verity:
            assert result.file_size > result.size
            v = result.verity
            proc = subprocess.run(
                [
                    veritysetup,
                    "verify",
                    str(fsmeta),
                    str(fsmeta),
                    v.root_hash,
                    f"--hash-offset={v.hash_offset}",
                ],
                capture_output=True,
                text=True,
            )
            assert proc.returncode == 0, proc.stderr
        else:
            assert result.file_size == result.size


def test_extents_list_the_whole_files(tmp_path: Path) -> None:
    layers = build_layers(tmp_path, EXTRA_LAYERS[:3])
    out = json.loads(
        run_cli(
            "merge",
            tmp_path / "m.fsmeta",
            *layers,
            "--verity",
            "--json",
            "--flat",
            tmp_path / "m.flat",
        ).stdout
    )
    extents = out["flat"]["extents"]
    files = [tmp_path / "m.fsmeta", *layers]
    assert [e["source"] for e in extents] == [str(f) for f in files]
    assert [e["length"] for e in extents] == [f.stat().st_size for f in files]
    assert [e["offset"] for e in extents[1:]] == [d["uniaddr"] * 4096 for d in out["devices"]]
    assert [e["image_length"] for e in extents[1:]] == [d["blocks"] * 4096 for d in out["devices"]]
    offset = 0
    for extent in extents:  # back to back, no gap
        assert extent["offset"] == offset
        offset += extent["length"]
    assert out["flat"]["size"] == offset and out["concatenable"] is True
    with open(tmp_path / "m.flat", "rb") as flat:
        for extent, f in zip(extents, files, strict=True):
            flat.seek(extent["offset"])
            assert flat.read(extent["length"]) == f.read_bytes()


def test_a_file_of_partial_blocks_is_padded_in_the_flat_image(tmp_path: Path) -> None:
    """A blob file that is not whole blocks (trailing bytes another tool left) cannot be
    joined with `cat`: the merge says so, and `--flat` pads it so the flat image mounts."""
    require_root()
    layers = build_layers(tmp_path, EXTRA_LAYERS[:2])
    with open(layers[0], "ab") as f:
        f.write(b"x" * 100)
    flat = tmp_path / "m.flat"
    result = merge_layers(layers, tmp_path / "m.fsmeta", flat_path=flat)
    assert not result.concatenable
    assert (
        result.devices[1].uniaddr * 4096
        > result.devices[0].uniaddr * 4096 + layers[0].stat().st_size
    )
    with mounted_erofs(flat) as mnt:
        assert (mnt / "l0" / "f70000").read_bytes() == b"A" * 70000
        assert (mnt / "l1" / "f5000").read_bytes() == b"B" * 5000


def test_a_truncated_blob_is_refused_in_one_line(tmp_path: Path) -> None:
    layers = build_layers(tmp_path, EXTRA_LAYERS[:2])
    with ErofsImage(layers[1]) as img:
        short = img.sb.blocks * 4096 - 4096
    with open(layers[1], "r+b") as f:
        f.truncate(short)
    proc = run_cli("merge", tmp_path / "m.fsmeta", *layers, check=False)
    assert proc.returncode != 0
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert str(layers[1]) in proc.stderr
    assert not (tmp_path / "m.fsmeta").exists()


@pytest.fixture
def _unmount_layers(tmp_path: Path):
    yield
    unmount_below(tmp_path)


def test_vm_mode_chain_files_joined_whole_mount(tmp_path: Path, _unmount_layers) -> None:
    """A VM-mode snapshot's published fsmeta and its layer files, joined whole in the order
    the description lists them, mount as one flat image showing the same tree."""
    require_root()
    sn = Snapshotter(tmp_path / "root")
    top = commit_chain(sn, 3)
    sn.prepare("default/9/container", top, {VM_MODE_LABEL: "true"})
    (description_path,) = (tmp_path / "root" / "fsmeta").glob("*/fsmeta.json")
    description = json.loads(description_path.read_text())
    fsmeta = Path(description["fsmeta"]["path"])
    layers = [Path(d["path"]) for d in description["layers"]]
    with ErofsImage(fsmeta) as img:
        assert [d["uniaddr"] for d in description["layers"]] == [
            s.uniaddr for s in img.device_slots
        ]
        assert [d["blocks"] for d in description["layers"]] == [s.blocks for s in img.device_slots]
    joined = tmp_path / "joined.img"
    _cat([fsmeta, *layers], joined)
    with mounted_fsmeta(fsmeta, layers) as mnt:
        want = tree_view(mnt)
    assert "etc/from-layer-3" in want and "gone" not in want
    with mounted_erofs(joined) as mnt:
        assert diff_views(tree_view(mnt), want) == []
        assert (mnt / "shared").read_text() == "top is 3\n"
