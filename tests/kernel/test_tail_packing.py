"""Tail packing (`convert`'s default, as mkfs.erofs's): a file's last partial block inline
after its inode. Judged by the kernel (the image mounted equals GNU tar's extraction and
mkfs.erofs 1.8's image), by fsck.erofs 1.8, and by the layout our reader sees; and
`--no-tail-packing` writes the image the library writes without it."""

from __future__ import annotations

import os
import random
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from snapshotter.erofs.format import LAYOUT_CHUNK_BASED, LAYOUT_FLAT_INLINE, LAYOUT_FLAT_PLAIN
from snapshotter.erofs.reader import ErofsImage
from snapshotter.erofs.tree import Extent, InlineTail
from snapshotter.erofs.writer import DataWriter
from snapshotter.fsmeta.merge import merge_layers
from snapshotter.ingest.convert import convert_layer
from tests.support.cli import convert
from tests.support.erofs_utils_oracle import ErofsUtils, mkfs_tar
from tests.support.helpers import mounted_erofs, mounted_fsmeta, overlay_of, require_root
from tests.support.layers import Entry, extract_with_gnu_tar, write_tar
from tests.support.treecompare import diff_views, hardlink_groups, tree_view


def nlinks(root: Path) -> dict[str, int]:
    """Path -> link count of every entry below ROOT."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            out[str(p.relative_to(root))] = p.lstat().st_nlink
    return out


def _data(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def tail_entries(bs: int, seed: int = 0) -> list[Entry]:
    """Files around block boundaries, a tail that cannot sit next to its inode's xattrs,
    sparse files with a tail (the head's end inside a chunk and on a chunk boundary), many
    tails of every length (the metadata's gap filling) and hardlinks to a packed file."""
    rng = random.Random(seed)
    entries = [Entry("./", "dir"), Entry("d", "dir"), Entry("many", "dir")]
    for n in sorted({513, bs - 1, bs, bs + 1, 2 * bs - 100, 2 * bs - 1, 3 * bs, 7 * bs + 5}):
        entries.append(Entry(f"d/size-{n}", data=_data(n, n)))
    entries += [
        # the tail fits no inode with these xattrs: whole blocks
        Entry("fat", data=_data(2 * bs - 64, 1), xattrs={"user.big": b"x" * (bs // 2)}),
        # a small xattr leaves room: inline
        Entry("slim", data=_data(bs + 100, 2), xattrs={"user.small": b"y"}),
        Entry("holes-mid", data=b"h" * 4096 + bytes(3 * 65536) + b"t" * 1000),
        Entry("holes-edge", data=b"a" * 65536 + bytes(65536) + b"z" * 100),
        Entry("link", "hardlink", link="d/size-" + str(bs + 1)),
    ]
    for i in range(150):
        n = rng.randrange(bs + 1, 4 * bs)
        entries.append(Entry(f"many/{i:03d}", data=_data(n, 1000 + i)))
    return entries


def _layouts(image: Path) -> dict[str, tuple[int, int]]:
    """Path -> (layout, size) of every regular file, as our reader sees the image."""
    out = {}
    with ErofsImage(image) as img:
        for raw, info in img.walk():
            if info.mode & 0o170000 == 0o100000:
                out[os.fsdecode(raw)] = (info.inode.layout, info.inode.size)
    return out


@pytest.mark.parametrize("block_size", [4096, 512])
def test_packed_tails_mount_equal_to_the_tar_and_to_mkfs_1_8(
    oracle: ErofsUtils, tmp_path: Path, block_size: int
) -> None:
    require_root()
    bs = block_size
    layer = write_tar(tmp_path / "l.tar", tail_entries(bs))
    packed, plain = tmp_path / "packed.erofs", tmp_path / "plain.erofs"
    convert(layer, packed, "--block-size", str(bs))
    convert(layer, plain, "--block-size", str(bs), "--no-tail-packing")
    theirs = mkfs_tar(oracle, layer, tmp_path / "theirs.erofs", "-b", str(bs))

    layouts = _layouts(packed)
    for n in (bs + 1, 2 * bs - 100, 7 * bs + 5):
        assert layouts[f"d/size-{n}"] == (LAYOUT_FLAT_INLINE, n), n
    if bs > 512:  # (a 512-byte file is a small file, stored inline whole)
        assert layouts[f"d/size-{bs}"][0] == LAYOUT_FLAT_PLAIN  # no partial block
    assert layouts[f"d/size-{3 * bs}"][0] == LAYOUT_FLAT_PLAIN
    assert layouts[f"d/size-{2 * bs - 1}"][0] == LAYOUT_FLAT_PLAIN  # a tail no inode fits
    assert layouts["fat"][0] == LAYOUT_FLAT_PLAIN  # no room beside its xattrs
    assert layouts["slim"][0] == LAYOUT_FLAT_INLINE
    assert layouts["holes-mid"][0] == LAYOUT_CHUNK_BASED
    assert layouts["holes-edge"][0] == LAYOUT_CHUNK_BASED
    for path, (lay, size) in layouts.items():
        if path.startswith("many/"):  # inline exactly when the tail fits an extended inode
            fits = size % bs and 64 + size % bs <= bs
            assert lay == (LAYOUT_FLAT_INLINE if fits else LAYOUT_FLAT_PLAIN), path
    assert sum(1 for lay, _ in layouts.values() if lay == LAYOUT_FLAT_INLINE) > 100
    assert all(lay != LAYOUT_FLAT_INLINE or size <= 512 for lay, size in _layouts(plain).values())
    assert packed.stat().st_size < plain.stat().st_size

    ref = tmp_path / "ref"
    extract_with_gnu_tar(layer, ref)
    want = tree_view(ref)
    with mounted_erofs(packed) as mp, mounted_erofs(plain) as mn, mounted_erofs(theirs) as mt:
        got = tree_view(mp)
        assert diff_views(got, want) == []
        assert diff_views(got, tree_view(mn)) == []
        assert diff_views(got, tree_view(mt)) == []
        assert hardlink_groups(mp) == hardlink_groups(ref)
        assert nlinks(mp) == nlinks(mt)
        for name in ("holes-mid", "holes-edge", f"d/size-{bs + 1}"):
            assert (mp / name).read_bytes() == (ref / name).read_bytes(), name

    for image in (packed, plain):
        check = subprocess.run([oracle.fsck, str(image)], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        out = tmp_path / f"extract-{image.stem}"
        proc = subprocess.run(
            [oracle.fsck, f"--extract={out}", str(image)], capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr
        for path, (_lay, size) in layouts.items():
            if not path.startswith("holes"):  # 1.8 leaves trailing holes short; none here
                assert (out / path).read_bytes() == (ref / path).read_bytes(), path
            assert (out / path).stat().st_size == size, path


def test_no_tail_packing_is_the_library_default_and_packing_is_deterministic(
    tmp_path: Path,
) -> None:
    layer = write_tar(tmp_path / "l.tar", tail_entries(4096, seed=3))
    cli_plain = tmp_path / "cli-plain.erofs"
    convert(layer, cli_plain, "--no-tail-packing")
    lib_plain = tmp_path / "lib-plain.erofs"
    convert_layer(layer, lib_plain)
    assert cli_plain.read_bytes() == lib_plain.read_bytes()

    a, b, c = tmp_path / "a.erofs", tmp_path / "b.erofs", tmp_path / "c.erofs"
    convert(layer, a)
    convert(layer, b)
    convert_layer(layer, c, tail_packing=True)
    assert a.read_bytes() == b.read_bytes() == c.read_bytes()
    assert a.read_bytes() != cli_plain.read_bytes()
    # the tree hashed while the image is written (diffID known) = hashed after, from the file
    ra = convert_layer(layer, tmp_path / "va.erofs", tail_packing=True, verity=True)
    rb = convert_layer(
        layer, tmp_path / "vb.erofs", tail_packing=True, verity=True, expected_diff_id=ra.diff_id
    )
    assert ra.verity is not None and rb.verity is not None
    assert ra.verity.root_hash == rb.verity.root_hash
    assert (tmp_path / "va.erofs").read_bytes() == (tmp_path / "vb.erofs").read_bytes()


def test_inline_budget_spent_means_whole_blocks(tmp_path: Path) -> None:
    """Held tail bytes are bounded: past the budget a file takes whole blocks, and the
    image still reads back (the tail written in place, the observer told in order)."""
    seen: list[tuple[int, int]] = []
    with open(tmp_path / "img", "wb+") as f:
        data = DataWriter(
            f.fileno(), 4096, 1, lambda off, raw: seen.append((off, len(raw))), tail_packing=True
        )
        content = _data(4096 + 10, 7)
        packed = data.add_file(_reader(content), len(content))
        data._inline_budget = 5  # less than the next tail
        whole = data.add_file(_reader(content), len(content))
        data.flush()
    assert isinstance(packed, InlineTail) and packed.tail == content[4096:]
    assert packed.head is not None and packed.head.nblocks == 1
    assert isinstance(whole, Extent) and whole.nblocks == 2
    assert seen == [(4096, 3 * 4096)]
    raw = (tmp_path / "img").read_bytes()
    assert raw[whole.start * 4096 : whole.start * 4096 + len(content)] == content


def _reader(content: bytes) -> Callable[[int], memoryview]:
    """read(n) over `content`, in pieces of at most 1000 bytes."""
    view = memoryview(content)
    pos = 0

    def read(n: int) -> memoryview:
        nonlocal pos
        piece = view[pos : pos + min(n, 1000)]
        pos += len(piece)
        return piece

    return read


def test_merge_of_tail_packed_layers_mounts_equal(tmp_path: Path) -> None:
    require_root()
    specs = [
        tail_entries(4096, seed=5),
        [
            Entry("d", "dir"),
            Entry("d/size-4097", data=_data(5000, 9)),  # replaced by another packed file
            Entry("d/.wh.size-513"),
            Entry("new", data=_data(3 * 4096 + 77, 10)),
        ],
    ]
    layers = []
    for i, entries in enumerate(specs):
        tar = write_tar(tmp_path / f"l{i}.tar", entries)
        out = tmp_path / f"l{i}.erofs"
        convert_layer(tar, out, verity=True, tail_packing=True)
        layers.append(out)
    fsmeta, flat = tmp_path / "m.fsmeta", tmp_path / "m.flat"
    result = merge_layers(layers, fsmeta, verity=True, flat_path=flat)
    with overlay_of(layers) as ovl:
        want = tree_view(ovl)
    assert "new" in want and "d/size-513" not in want
    with mounted_fsmeta(fsmeta, layers) as mnt:
        assert diff_views(tree_view(mnt), want) == []
    with mounted_erofs(flat) as mnt:
        assert diff_views(tree_view(mnt), want) == []

    # The tails stay inline in the fsmeta, their whole blocks on the layers' devices: no
    # block of file data in the fsmeta (its tails take less room than a block each).
    layouts = _layouts(fsmeta)
    assert layouts["new"] == (LAYOUT_FLAT_INLINE, 3 * 4096 + 77)
    assert layouts["d/size-4097"] == (LAYOUT_FLAT_INLINE, 5000)
    packed = [p for p, (lay, size) in layouts.items() if lay == LAYOUT_FLAT_INLINE and size > 4096]
    assert len(packed) > 100
    tails = sum(size % 4096 for p, (_lay, size) in layouts.items() if p in packed)
    assert result.size < tails + 64 * 4096

    # A parent fsmeta holding such tails is not continued from (its heads are flat
    # addresses): the merge starts over, with the same bytes.
    merge_layers(layers[:1], tmp_path / "p.fsmeta")
    merge_layers(layers, tmp_path / "inc.fsmeta", verity=True, parent=tmp_path / "p.fsmeta")
    assert (tmp_path / "inc.fsmeta").read_bytes() == fsmeta.read_bytes()


def test_merged_tail_that_no_longer_fits_its_inode(oracle: ErofsUtils, tmp_path: Path) -> None:
    """A tail that fits a compact inode in its layer (mkfs.erofs 1.8 packs it there) but not
    the merged inode (extended: its mtime is not the fsmeta's build time) gets a block of
    its own in the fsmeta, after the head's blocks on the layer's device, chunk by chunk;
    the kernel reads it back."""
    require_root()
    content = _data(4096 + 4096 - 40, 11)  # a 4056-byte tail: fits after 32 bytes, not 64
    low = write_tar(tmp_path / "l0.tar", [Entry("f", data=content, mtime=1_600_000_000)])
    layers = [mkfs_tar(oracle, low, tmp_path / "l0.erofs", "-T", "1600000000")]
    top = write_tar(tmp_path / "l1.tar", [Entry(f"o{i}", data=b"o") for i in range(5)])
    convert_layer(top, tmp_path / "l1.erofs", tail_packing=True)  # the build time: theirs
    layers.append(tmp_path / "l1.erofs")
    assert _layouts(layers[0])["f"][0] == LAYOUT_FLAT_INLINE
    fsmeta, flat = tmp_path / "m.fsmeta", tmp_path / "m.flat"
    merge_layers(layers, fsmeta, flat_path=flat)
    assert _layouts(fsmeta)["f"][0] == LAYOUT_CHUNK_BASED
    with mounted_fsmeta(fsmeta, layers) as mnt:
        assert (mnt / "f").read_bytes() == content
    with mounted_erofs(flat) as mnt:
        assert (mnt / "f").read_bytes() == content
