"""The fsmeta merge, judged by the kernel: the merged image mounted with its layer blobs as
`device=`s (and the flat image mounted alone) must show exactly what the kernel's overlayfs
shows over the same layer images."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from snapshotter.erofs.reader import ErofsImage
from snapshotter.fsmeta.merge import merge_layers
from tests.support.cli import run_cli
from tests.support.helpers import mounted_erofs, mounted_fsmeta, overlay_of, require_root
from tests.support.layers import IMAGE_LAYERS, Entry, build_layers
from tests.support.treecompare import diff_views, hardlink_groups, tree_view


def test_merged_view_equals_overlayfs(tmp_path: Path) -> None:
    require_root()
    layers = build_layers(tmp_path, IMAGE_LAYERS)
    fsmeta = tmp_path / "image.fsmeta"
    flat = tmp_path / "image.flat"
    result = merge_layers(layers, fsmeta, verity=True, flat_path=flat)
    assert result.size < 64 * 1024, "the fsmeta must be metadata only"
    with overlay_of(layers) as ovl:
        want = tree_view(ovl)
        want_links = hardlink_groups(ovl)
    assert "etc/a" in want and "etc/sub/deep" not in want and "bin/busybox" not in want
    with mounted_fsmeta(fsmeta, layers) as mnt:
        assert diff_views(tree_view(mnt), want) == []
        assert hardlink_groups(mnt) == want_links
        assert not any(
            name.startswith("trusted.overlay.")
            for view in tree_view(mnt).values()
            for name, _ in view.xattrs
        )
    with mounted_erofs(flat) as mnt:  # one device, no options (Linux >= 6.3)
        assert diff_views(tree_view(mnt), want) == []


def test_device_table_and_determinism(tmp_path: Path) -> None:
    layers = build_layers(tmp_path, IMAGE_LAYERS)
    a = merge_layers(layers, tmp_path / "a.fsmeta", verity=True)
    b = merge_layers(layers, tmp_path / "b.fsmeta", verity=True)
    assert (tmp_path / "a.fsmeta").read_bytes() == (tmp_path / "b.fsmeta").read_bytes()
    assert a.verity.root_hash == b.verity.root_hash
    with ErofsImage(tmp_path / "a.fsmeta") as img:
        slots = img.device_slots
        assert [s.blocks for s in slots] == [ErofsImage(p).sb.blocks for p in layers]
        assert [s.tag.decode() for s in slots] == [ErofsImage(p).sb.uuid.hex() for p in layers]
        # Device N starts where the whole file of device N-1 ends: the fsmeta's with its
        # appended verity tree, then each blob's with its tree.
        assert (tmp_path / "a.fsmeta").stat().st_size > img.sb.blocks * 4096
        assert slots[0].uniaddr * 4096 == (tmp_path / "a.fsmeta").stat().st_size
        assert layers[0].stat().st_size > slots[0].blocks * 4096
        assert slots[1].uniaddr * 4096 == slots[0].uniaddr * 4096 + layers[0].stat().st_size
        # Every regular file's data points into a layer blob, never into the fsmeta.
        for _path, info in img.walk():
            for ref in img.data_map(info) if info.mode & 0o170000 == 0o100000 else []:
                assert ref.blkaddr is None or ref.device >= 1


def test_merge_cli_with_digest_tags(tmp_path: Path) -> None:
    import hashlib

    layers = build_layers(tmp_path, IMAGE_LAYERS[:2])
    tags = []
    for p in layers:
        with ErofsImage(p) as img:
            tags.append(hashlib.sha256(p.read_bytes()[: img.sb.blocks * 4096]).hexdigest())
    out = json.loads(
        run_cli(
            "merge",
            tmp_path / "m.fsmeta",
            *layers,
            "--json",
            "--verity",
            "--flat",
            tmp_path / "m.flat",
            *[a for t in tags for a in ("--tag", t)],
        ).stdout
    )
    assert [d["tag"] for d in out["devices"]] == tags
    assert out["flat"]["extents"][1]["offset"] == out["devices"][0]["uniaddr"] * 4096
    assert out["verity"]["root_hash"] and out["flat"]["verity"]["root_hash"]
    proc = run_cli("merge", tmp_path / "bad.fsmeta", tmp_path / "missing.erofs", check=False)
    assert proc.returncode != 0 and "missing.erofs" in proc.stderr
    assert not (tmp_path / "bad.fsmeta").exists()


def test_merge_of_many_layers_and_files(tmp_path: Path) -> None:
    """500 layers over a 100k-file base: correct, and one mount with no option string."""
    require_root()
    rng = random.Random(5)
    base = [Entry("./", "dir")]
    for d in range(100):
        base.append(Entry(f"d{d:03d}", "dir"))
        base += [Entry(f"d{d:03d}/f{i:04d}", data=b"%d/%d" % (d, i)) for i in range(1000)]
    specs = [base]
    removed, rewritten = set(), {}
    for n in range(1, 500):
        d, i = rng.randrange(100), rng.randrange(1000)
        path = f"d{d:03d}/f{i:04d}"
        if n % 2:
            specs.append([Entry(f"d{d:03d}", "dir"), Entry(f"d{d:03d}/.wh.f{i:04d}")])
            removed.add(path)
            rewritten.pop(path, None)
        else:
            specs.append([Entry(f"d{d:03d}", "dir"), Entry(path, data=b"layer %d" % n)])
            rewritten[path] = b"layer %d" % n
            removed.discard(path)
    layers = build_layers(tmp_path, specs)
    fsmeta, flat = tmp_path / "big.fsmeta", tmp_path / "big.flat"
    merge_layers(layers, fsmeta, flat_path=flat)
    with ErofsImage(fsmeta) as img:
        assert img.sb.extra_devices == 500
    with mounted_erofs(flat) as mnt:
        files = {str(p.relative_to(mnt)) for p in mnt.glob("d*/f*")}
        assert len(files) == 100_000 - len(removed)
        assert not files & removed
        for path, data in rewritten.items():
            assert (mnt / path).read_bytes() == data
        for path in rng.sample(sorted(files - rewritten.keys()), 200):
            d, i = path.split("/")
            assert (mnt / path).read_bytes() == b"%d/%d" % (int(d[1:]), int(i[1:]))


def test_hundred_devices_mount_without_long_options(tmp_path: Path) -> None:
    """Where mount(2)'s one-page option string ends, fsconfig goes on."""
    require_root()
    specs = [[Entry("./", "dir"), Entry(f"layer{n:03d}", data=b"%d" % n)] for n in range(300)]
    layers = build_layers(tmp_path, specs)
    fsmeta = tmp_path / "m.fsmeta"
    merge_layers(layers, fsmeta)
    options = ",".join(f"device=/dev/loop{n}" for n in range(300))
    assert len(options) > os.sysconf("SC_PAGE_SIZE")
    with mounted_fsmeta(fsmeta, layers) as mnt:
        for n in (0, 137, 299):
            assert (mnt / f"layer{n:03d}").read_bytes() == b"%d" % n
        assert len(os.listdir(mnt)) == 300


def test_swapped_devices_read_garbage_not_errors(tmp_path: Path) -> None:
    """The kernel does not check which blob is which: only verity roots bound to the device
    table (the signed manifest) can. This pins down that fact."""
    require_root()
    specs = [[Entry("./", "dir"), Entry("a", data=b"A" * 5000)], [Entry("b", data=b"B" * 5000)]]
    layers = build_layers(tmp_path, specs)
    merge_layers(layers, tmp_path / "m.fsmeta")
    with mounted_fsmeta(tmp_path / "m.fsmeta", list(reversed(layers))) as mnt:
        assert (mnt / "a").read_bytes() != b"A" * 5000


@pytest.mark.parametrize("bad", ["missing", "not-erofs"])
def test_bad_layers_are_refused(tmp_path: Path, bad: str) -> None:
    from snapshotter.errors import EpError

    path = tmp_path / "layer.erofs"
    if bad == "not-erofs":
        path.write_bytes(b"\0" * 8192)
    with pytest.raises(EpError):
        merge_layers([path], tmp_path / "out.fsmeta")
    assert not (tmp_path / "out.fsmeta").exists()
