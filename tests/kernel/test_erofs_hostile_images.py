"""Untrusted EROFS images (a registry's native layer, a merge input) with damaged metadata:
every damage ends in a clear EpError or in a readable image, never a traceback or a hang.

Each validation is tested with a real image from our writer, damaged precisely where the
structure lies (found with our reader, changed with struct.pack_into); the superblock checksum
is checked against the kernel itself. The fuzz test below damages random metadata bytes; its
seed is fixed and its example database (tests/fuzz/examples) is committed.
"""

from __future__ import annotations

import io
import os
import stat
import struct
import time
from array import array
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from snapshotter.erofs.format import NULL_ADDR, SUPER_OFFSET, Dirent
from snapshotter.erofs.reader import ErofsImage
from snapshotter.erofs.tree import Chunks, Node
from snapshotter.erofs.writer import DataWriter, ImageParams, header_blocks, write_metadata
from snapshotter.errors import EpError
from snapshotter.fsmeta.merge import merge_layers
from snapshotter.ingest.convert import convert_layer, import_erofs_image
from snapshotter.ingest.validate import InvalidLayer, superblock_checksum
from tests.fuzz import targets
from tests.support.helpers import mounted_erofs, require_root
from tests.support.layers import Entry, awkward_entries, write_tar


@pytest.fixture(scope="module")
def good_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("hostile")
    out = tmp / "good.erofs"
    convert_layer(write_tar(tmp / "l.tar", awkward_entries()), out)
    return out


@pytest.fixture(scope="module")
def fuzz_work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def erofs_base(fuzz_work: Path) -> tuple[bytes, targets.HotSpots]:
    base = targets.TARGETS["erofs-import"].base(fuzz_work)
    return base, targets.TARGETS["erofs-import"].hot_spots(base, fuzz_work)


@seed(20261201)
@settings(
    max_examples=int(os.environ.get("EROFS_FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_damaged_metadata_is_an_error_or_harmless(
    erofs_base: tuple[bytes, targets.HotSpots], tmp_path: Path, data: st.DataObject
) -> None:
    """Import refuses the damage with an EpError or accepts an image that then merges and
    reads; the merge and the reader, given the damaged image directly, refuse it with an
    EpError or use it. (`make fuzz` runs the same targets for minutes.)"""
    base, spots = erofs_base
    damage = data.draw(targets.damages(spots, len(base), SUPER_OFFSET), label="damage")
    image = targets.apply(base, damage)
    for name in ("erofs-import", "erofs-merge", "erofs-reader"):
        with targets.time_limit(10):
            targets.TARGETS[name].run(image, tmp_path)


@pytest.mark.parametrize("example", targets.committed_examples(), ids=lambda p: p.stem)
def test_committed_fuzz_examples_stay_fixed(fuzz_work: Path, tmp_path: Path, example: Path) -> None:
    """Every damage the fuzzing once found a bug with (tests/fuzz/examples) is replayed."""
    target, damage = targets.load_example(example)
    with targets.time_limit(20):
        target.run(targets.apply(target.base(fuzz_work), damage), tmp_path)


def _cyclic_image(tmp_path: Path) -> bytes:
    """A real image whose `sub/x` entry is rewritten to point back at the root directory."""
    out = tmp_path / "cycle.erofs"
    convert_layer(
        write_tar(
            tmp_path / "l.tar", [Entry("./", "dir"), Entry("sub", "dir"), Entry("sub/x", data=b"x")]
        ),
        out,
    )
    with ErofsImage(out) as img:
        root, listing = img.root_nid, img.read(img.lookup("sub"))
    image = bytearray(out.read_bytes())
    pos = image.find(listing)
    for i in range(0, 36, 12):  # the three dirents: '.', '..', 'x'
        if image[pos + i + 10] == 1:  # the regular file's (file type 1)
            image[pos + i : pos + i + 8] = root.to_bytes(8, "little")
            image[pos + i + 10] = 2
    return bytes(image)


def test_directory_cycle_is_refused(tmp_path: Path) -> None:
    with pytest.raises(EpError, match="cycle"):
        import_erofs_image(io.BytesIO(_cyclic_image(tmp_path)), tmp_path / "copy.erofs")


def test_merge_refuses_a_directory_cycle(tmp_path: Path) -> None:
    layer = tmp_path / "layer.erofs"
    layer.write_bytes(_cyclic_image(tmp_path))
    with pytest.raises(EpError, match="cycle"):
        merge_layers([layer], tmp_path / "m.fsmeta")


# -- precise damage: each check of validate.py, on a real image ---------------------------------

# Byte offsets inside the superblock (struct erofs_super_block) and inodes (erofs_inode_*).
SB_CHECKSUM, SB_COMPAT, SB_BLKSZBITS, SB_ROOT_NID, SB_BLOCKS = 4, 8, 12, 14, 36
SB_EXTRA_DEVICES, SB_DIRBLKBITS = 86, 90
INODE_FORMAT, INODE_MODE, INODE_SIZE, INODE_I_U = 0, 4, 8, 16


class Damage:
    """A writable copy of a good image and where its structures lie (found by our reader)."""

    def __init__(self, good: Path) -> None:
        self.image = bytearray(good.read_bytes())
        self.img = ErofsImage(good)

    def inode(self, path: str) -> int:
        return self.img.lookup(path).pos

    def nid(self, path: str) -> int:
        return self.img.lookup(path).nid

    def dirents(self, path: str) -> int:
        """Byte offset of the directory's first block of entries."""
        info = self.img.lookup(path)
        ref = self.img.data_map(info)[0]
        return ref.inline_pos if ref.inline_pos is not None else ref.blkaddr * 4096

    def dirent(self, path: str, name: bytes) -> tuple[int, int]:
        """(offset of the entry, offset of its name) in the directory's first block."""
        base = self.dirents(path)
        block = bytes(self.image[base : base + 4096])
        count = Dirent.unpack(block).nameoff // Dirent.SIZE
        for i in range(count):
            ent = Dirent.unpack(block, i * Dirent.SIZE)
            end = (
                Dirent.unpack(block, (i + 1) * Dirent.SIZE).nameoff
                if i + 1 < count
                else ent.nameoff + len(name)
            )
            if block[ent.nameoff : end] == name:
                return base + i * Dirent.SIZE, base + ent.nameoff
        raise AssertionError(f"{name!r} not in the first block of {path}")

    def pack(self, fmt: str, offset: int, *values: int) -> None:
        struct.pack_into(fmt, self.image, offset, *values)

    def chunk_table(self, path: str) -> int:
        info = self.img.lookup(path)
        return (info.data_pos + 7) & ~7


def _sb(d: Damage, fmt: str, field: int, value: int) -> None:
    d.pack(fmt, SUPER_OFFSET + field, value)


def _rename(d: Damage, directory: str, old: bytes, new: bytes) -> None:
    _, name_pos = d.dirent(directory, old)
    d.image[name_pos : name_pos + len(old)] = new


def _point(d: Damage, directory: str, name: bytes, nid: int, ftype: int) -> None:
    pos, _ = d.dirent(directory, name)
    d.pack("<QHB", pos, nid, Dirent.unpack(d.image, pos).nameoff, ftype)


DAMAGES: dict[str, tuple[Callable[[Damage], None], str]] = {
    "superblock checksum wrong": (
        lambda d: (_sb(d, "<I", SB_COMPAT, 1), _sb(d, "<I", SB_CHECKSUM, 0x12345678)),
        r"superblock checksum 0x12345678",
    ),
    "block size above the page size": (
        lambda d: _sb(d, "<B", SB_BLKSZBITS, 13),
        r"block size 2\^13",
    ),
    "more blocks than the blob": (
        lambda d: _sb(d, "<I", SB_BLOCKS, len(d.image) // 4096 + 1),
        r"claims \d+ bytes",
    ),
    "directory block bits": (lambda d: _sb(d, "<B", SB_DIRBLKBITS, 1), r"directory block bits 1"),
    "an extra device": (lambda d: _sb(d, "<H", SB_EXTRA_DEVICES, 1), r"multi-device"),
    "root is a file": (
        lambda d: _sb(d, "<H", SB_ROOT_NID, d.nid("etc/hostname")),
        r"root is not a directory",
    ),
    "file blocks beyond the image": (
        lambda d: d.pack("<I", d.inode("sizes/f65536") + INODE_I_U, len(d.image) // 4096 - 3),
        r"/sizes/f65536 \(nid \d+\): .*data blocks \d+\+16 beyond the image",
    ),
    "file size beyond the image": (
        lambda d: d.pack("<I", d.inode("sizes/f4096") + INODE_SIZE, 0xFFFFFFF0),
        r"/sizes/f4096 .*beyond the image",
    ),
    "a 1 TB inline file": (  # owners/wide: extended inode, 1 byte inline
        lambda d: d.pack("<Q", d.inode("owners/wide") + INODE_SIZE, (1 << 40) + 4097),
        r"/owners/wide .*data blocks 0\+268435457 beyond the image",
    ),
    "inline tail crossing its block": (
        lambda d: d.pack("<I", d.inode("sizes/f512") + INODE_SIZE, 4095),
        r"/sizes/f512 .*inline data crosses a block",
    ),
    "a chunk table the image cannot hold": (
        lambda d: (
            d.pack("<I", d.inode("sparse") + INODE_SIZE, 0xFFFFFFFF),
            d.pack("<I", d.inode("sparse") + INODE_I_U, 0x20),
        ),
        r"/sparse .*chunk table of 1048576 entries .*beyond the image",
    ),
    "a chunk beyond the image": (
        lambda d: d.pack("<I", d.chunk_table("sparse") + 4 * 8 + 4, 0xFFFFFFF0),
        r"/sparse \(nid \d+\): data blocks 4294967280\+10 beyond the image",
    ),
    "a chunk on another device": (
        lambda d: d.pack("<H", d.chunk_table("sparse") + 2, 1),
        r"/sparse .*data on device 1, but the image has 0 extra devices",
    ),
    "an unknown chunk format": (
        lambda d: d.pack("<I", d.inode("sparse") + INODE_I_U, 0x44),
        r"/sparse .*unknown chunk format 0x44",
    ),
    "a '/' in a name": (
        lambda d: _rename(d, "etc", b"hostname", b"host/ame"),
        r"/etc \(nid \d+\): .*invalid file name b'host/ame'",
    ),
    "a NUL in a name": (
        lambda d: _rename(d, "etc", b"hostname", b"host\0ame"),
        r"/etc .*invalid file name b'host\\x00ame'",
    ),
    "a second '..'": (
        lambda d: _rename(d, "sizes", b"f0", b".."),
        r"/sizes .*not sorted: b'\.\.' after b'\.\.'",
    ),
    "names out of order": (
        lambda d: (_rename(d, "sizes", b"f0", b"fX"), _rename(d, "sizes", b"f1", b"f0")),
        r"/sizes .*not sorted: b'f0' after b'fX'",
    ),
    "a name offset going back": (
        lambda d: d.pack("<H", d.dirent("etc", b"hostname")[0] + 8, 40),
        r"/etc .*entry \d+ has a name of bogus length",
    ),
    "'.' pointing elsewhere": (
        lambda d: _point(d, "etc", b".", d.nid("bin"), 2),
        r"/etc .*'\.' entry points at nid \d+, not at nid \d+",
    ),
    "a file type that lies": (
        lambda d: _point(d, "etc", b"hostname", d.nid("etc/hostname"), 2),
        r"/etc/hostname .*file type 2 does not match",
    ),
    "a hardlinked directory": (
        lambda d: _point(d, "sizes", b"f0", d.nid("bin"), 2),
        r"/sizes/f0 .*directory reached twice",
    ),
    "a mode of no file type": (
        lambda d: d.pack("<H", d.inode("etc/hostname") + INODE_MODE, 0o644),
        r"/etc/hostname .*bogus file mode 0o644",
    ),
    "a symlink target over 4095 bytes": (
        lambda d: d.pack("<I", d.inode("bin/longlink") + INODE_SIZE, 4096 + 303),
        r"/bin/longlink .*(crosses a block|beyond|symlink target)",
    ),
    "a shared xattr beyond the image": (
        lambda d: d.pack("<I", d.inode("xattrs/user") + 32 + 12, 0x00FFFFFF),
        r"/xattrs/user .*shared xattr 16777215 beyond the image",
    ),
    "an xattr area beyond its entries": (
        lambda d: d.pack("<H", d.inode("etc/hostname") + 2, 0xFFFF),
        r"/etc/hostname \(nid \d+\): xattrs of 262148 bytes beyond the image",
    ),
}


def _assert_refused(image: bytes, tmp_path: Path, match: str) -> InvalidLayer:
    out_dir = tmp_path / "store"
    out_dir.mkdir()
    with pytest.raises(InvalidLayer, match=match) as caught:
        import_erofs_image(io.BytesIO(image), out_dir / "layer.erofs")
    assert "\n" not in str(caught.value)
    assert list(out_dir.iterdir()) == []  # nothing half-written left
    return caught.value


@pytest.mark.parametrize("damage", DAMAGES, ids=list(DAMAGES))
def test_damaged_layer_is_refused_naming_what(
    good_image: Path, tmp_path: Path, damage: str
) -> None:
    edit, match = DAMAGES[damage]
    d = Damage(good_image)
    try:
        edit(d)
    finally:
        d.img.close()
    started = time.monotonic()
    _assert_refused(bytes(d.image), tmp_path, match)
    assert time.monotonic() - started < 5


def test_the_good_image_itself_is_accepted(good_image: Path, tmp_path: Path) -> None:
    result = import_erofs_image(io.BytesIO(good_image.read_bytes()), tmp_path / "ok.erofs")
    assert result.entries == sum(1 for _ in ErofsImage(good_image).walk()) - 1


def _with_checksum(good: Path, blkszbits: int, value: int | None) -> bytes:
    """The image with the checksum feature on: `value`, or the right checksum when None."""
    image = bytearray(good.read_bytes())
    struct.pack_into("<I", image, SUPER_OFFSET + SB_COMPAT, 1)
    if value is None:
        value = superblock_checksum(bytes(image[:8192]), blkszbits)
    struct.pack_into("<I", image, SUPER_OFFSET + SB_CHECKSUM, value)
    return bytes(image)


@pytest.mark.parametrize("block_size", [4096, 2048, 1024, 512])
def test_superblock_checksum_is_computed_as_the_kernel_does(
    tmp_path: Path, block_size: int
) -> None:
    """The kernel checks the crc32c when the feature bit is set, over a range that depends on
    the block size: it mounts the image with our checksum and refuses it with another; we
    accept and refuse the same two images."""
    require_root()
    good = tmp_path / "good.erofs"
    convert_layer(
        write_tar(tmp_path / "l.tar", [Entry("./", "dir"), Entry("etc/hostname", data=b"box\n")]),
        good,
        block_size=block_size,
    )
    bits = block_size.bit_length() - 1
    right = tmp_path / "right.erofs"
    right.write_bytes(_with_checksum(good, bits, None))
    wrong = tmp_path / "wrong.erofs"
    wrong.write_bytes(_with_checksum(good, bits, 0x12345678))
    with mounted_erofs(right) as mnt:
        assert (mnt / "etc/hostname").read_bytes() == b"box\n"
    with pytest.raises(AssertionError, match="kernel refused"), mounted_erofs(wrong):
        pass
    import_erofs_image(io.BytesIO(right.read_bytes()), tmp_path / "ok.erofs")
    _assert_refused(wrong.read_bytes(), tmp_path, "superblock checksum")


# -- the merge re-checks what it relies on ------------------------------------------------------


def _write_tree(path: Path, fill: Callable[[DataWriter], dict[bytes, Node]]) -> Path:
    """An image from our writer with the children `fill` builds (data placed through it):
    what a hostile or unusual tool could write, bypassing every import check."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        data = DataWriter(fd, 4096, header_blocks(4096))
        root = Node.directory()
        root.children = fill(data)
        write_metadata(data, root, ImageParams(block_size=4096, build_time=1_700_000_000))
    finally:
        os.close(fd)
    return path


HUGE_LAST_CHUNK = ((1 << 17) - 1) << 43  # offset of chunk 131,071 of 8 TiB chunks
HUGE_SIZE = HUGE_LAST_CHUNK + 4096  # just under 2^60 bytes


def _sparse_2_60(data: DataWriter) -> dict[bytes, Node]:
    """A file of almost 2^60 bytes in 131,072 chunks of 8 TiB: all holes but the last, one
    marked block. It needs its whole chunk table (1 MiB) in the image, and has it."""
    mark = data.add_blocks(b"END-MARK".ljust(4096, b"."))
    addrs = array("I", [NULL_ADDR]) * (1 << 17)
    addrs[-1] = mark.start
    return {
        b"huge": Node(
            mode=stat.S_IFREG | 0o644, size=HUGE_SIZE, data=Chunks(31, addrs), mtime=1_700_000_000
        )
    }


def test_a_2_60_byte_sparse_file_keeps_all_its_chunks_through_the_merge(tmp_path: Path) -> None:
    """Every chunk of the file has its index in the fsmeta: the kernel reads the last chunk's
    block from the layer, not whatever follows a too-short chunk table."""
    require_root()
    layer = _write_tree(tmp_path / "sparse.erofs", _sparse_2_60)
    with mounted_erofs(layer) as mnt, open(mnt / "huge", "rb") as f:  # the kernel's reading
        assert os.pread(f.fileno(), 8, HUGE_LAST_CHUNK) == b"END-MARK"
    stored = tmp_path / "stored.erofs"
    import_erofs_image(io.BytesIO(layer.read_bytes()), stored)
    merged = merge_layers([stored], tmp_path / "m.fsmeta")
    with mounted_erofs(merged.fsmeta, [stored]) as mnt, open(mnt / "huge", "rb") as f:
        assert os.fstat(f.fileno()).st_size == HUGE_SIZE
        assert os.pread(f.fileno(), 8, HUGE_LAST_CHUNK) == b"END-MARK"
        assert os.pread(f.fileno(), 4096, 1 << 59) == bytes(4096)


def _plain_file(data: DataWriter) -> dict[bytes, Node]:
    block = data.add_blocks(b"B" * 4096)
    return {
        b"big": Node(
            mode=stat.S_IFREG | 0o644, size=4096, data=block, uid=70000, mtime=1_700_000_000
        )
    }


def test_merge_refuses_a_file_larger_than_its_layer(tmp_path: Path) -> None:
    """A layer that never went through the import (given to `merge` directly) claiming a
    2^60-byte file in one extent: the merge refuses it instead of addressing 2^60 bytes from
    one chunk index (the kernel would read the fsmeta's own blocks as file data)."""
    layer = _write_tree(tmp_path / "plain.erofs", _plain_file)
    d = Damage(layer)
    try:
        d.pack("<Q", d.inode("big") + INODE_SIZE, 1 << 60)
    finally:
        d.img.close()
    layer.write_bytes(bytes(d.image))
    with pytest.raises(EpError, match=r"data blocks \d+\+\d+ beyond the image"):
        merge_layers([layer], tmp_path / "m.fsmeta")
    assert not (tmp_path / "m.fsmeta").exists()


def test_merge_refuses_addresses_beyond_32_bits(tmp_path: Path) -> None:
    """A chunk index near 2^32 (what the fuzz found: an OverflowError traceback) is an
    EpError naming the layer."""
    layer = tmp_path / "layer.erofs"
    convert_layer(
        write_tar(
            tmp_path / "l.tar", [Entry("./", "dir"), Entry("s", data=b"a" + bytes(300_000) + b"z")]
        ),
        layer,
    )
    d = Damage(layer)
    try:
        d.pack("<I", d.chunk_table("s") + 4 * 8 + 4, 0xFFFFFFF0)
    finally:
        d.img.close()
    layer.write_bytes(bytes(d.image))
    with pytest.raises(EpError, match=r"layer\.erofs: nid \d+: data blocks 4294967280\+1"):
        merge_layers([layer], tmp_path / "m.fsmeta")


@pytest.mark.parametrize("name", [b"a/b", b"x\0y", b"..."])
def test_merge_refuses_names_the_kernel_cannot_show(tmp_path: Path, name: bytes) -> None:
    """Names with '/' or NUL never reach an fsmeta (the kernel's readdir would hand them to
    user space, or entries would alias); '...' is a fine name and merges."""

    def fill(data: DataWriter) -> dict[bytes, Node]:  # "z" after it: a last name ends at NUL
        return {
            name: Node(mode=stat.S_IFREG | 0o644, mtime=1_700_000_000),
            b"z": Node(mode=stat.S_IFREG | 0o644, mtime=1_700_000_000),
        }

    layer = _write_tree(tmp_path / "names.erofs", fill)
    if name == b"...":
        merged = merge_layers([layer], tmp_path / "m.fsmeta")
        with ErofsImage(merged.fsmeta) as img:
            assert img.lookup(b"...").size == 0
        return
    with pytest.raises(EpError, match="invalid file name"):
        merge_layers([layer], tmp_path / "m.fsmeta")
    with pytest.raises(InvalidLayer, match="invalid file name"):
        import_erofs_image(io.BytesIO(layer.read_bytes()), tmp_path / "copy.erofs")
