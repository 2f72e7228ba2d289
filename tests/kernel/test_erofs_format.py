"""Each on-disk structure: what `pack` writes, `unpack` reads back, at the kernel's sizes."""

from __future__ import annotations

import pytest

from snapshotter.erofs.format import (
    ChunkIndex,
    DeviceSlot,
    Dirent,
    FormatError,
    Inode,
    SuperBlock,
    XattrEntry,
    XattrIbody,
    decode_dev,
    encode_dev,
    split_xattr_name,
)


def test_sizes_match_the_kernel() -> None:
    assert len(SuperBlock().pack()) == 128
    assert len(Inode(mode=0o100644, extended=False).pack()) == 32
    assert len(Inode(mode=0o100644, extended=True).pack()) == 64
    assert len(DeviceSlot(tag=b"t").pack()) == 128
    assert len(Dirent(1, 12, 1).pack()) == 12
    assert len(ChunkIndex(5).pack()) == 8


def test_round_trips() -> None:
    sb = SuperBlock(
        blkszbits=12,
        root_nid=128,
        inos=7,
        build_time=1_700_000_000,
        blocks=99,
        meta_blkaddr=3,
        xattr_blkaddr=2,
        uuid=bytes(range(16)),
        extra_devices=2,
        devt_slotoff=9,
        feature_incompat=0xC,
    )
    assert SuperBlock.unpack(sb.pack()) == sb
    ext = Inode(
        mode=0o100644,
        extended=True,
        nlink=70_000,
        size=5 << 32,
        i_u=42,
        ino=9,
        uid=2**32 - 1,
        gid=65_536,
        mtime=-5,
        mtime_nsec=999_999_999,
    )
    assert Inode.unpack(ext.pack()) == ext
    compact = Inode(
        mode=0o40755,
        extended=False,
        nlink=3,
        size=100,
        i_u=7,
        ino=1,
        uid=1,
        gid=2,
        mtime=77,
        mtime_nsec=5,
    )
    assert Inode.unpack(compact.pack(), build_time=77, build_time_nsec=5) == compact
    slot = DeviceSlot(tag=b"sha256:abc", blocks=(1 << 33) + 5, uniaddr=(1 << 40) + 1)
    assert DeviceSlot.unpack(slot.pack()) == slot
    body = XattrIbody(
        shared_ids=[3, 9],
        entries=[XattrEntry(b"user.k", b"v" * 5), XattrEntry(b"system.posix_acl_access", b"\2")],
    )
    assert XattrIbody.unpack(body.pack()) == body
    assert body.icount == 1 + (len(body.pack()) - 12) // 4


def test_struct_level_forms_write_and_read_the_same_bytes() -> None:
    """`Inode.pack_into`/`unpack_fields` and `Dirent.pack_block`/`unpack_block`, which the
    merge and the writer use instead of objects, agree with `pack`/`unpack`."""
    for ino in (
        Inode(mode=0o100644, extended=True, layout=4, xattr_icount=3, nlink=70_000,
              size=5 << 32, i_u=0x25, ino=9, uid=2**32 - 1, gid=65_536, mtime=-5,
              mtime_nsec=999_999_999),
        Inode(mode=0o40755, extended=False, layout=2, nlink=3, size=100, i_u=7, ino=1,
              uid=1, gid=2, mtime=77, mtime_nsec=5),
    ):  # fmt: skip
        buf = bytearray(b"\xee" * 100)
        Inode.pack_into(
            buf, 4, ino.extended, ino.layout, ino.xattr_icount, ino.mode, ino.nlink, ino.size,
            ino.i_u, ino.ino, ino.uid, ino.gid, ino.mtime, ino.mtime_nsec,
        )  # fmt: skip
        assert bytes(buf[4 : 4 + ino.isize]) == ino.pack()
        assert buf[:4] == b"\xee" * 4 and buf[4 + ino.isize :] == b"\xee" * (96 - ino.isize)
        fmt, icount, mode, nlink, size, i_u, uid, gid, mtime, nsec = Inode.unpack_fields(buf, 4)
        assert (fmt & 1, fmt >> 1) == (ino.extended, ino.layout)
        assert (icount, mode, nlink, size, i_u, uid, gid) == (
            ino.xattr_icount, ino.mode, ino.nlink, ino.size, ino.i_u, ino.uid, ino.gid,
        )  # fmt: skip
        assert (mtime, nsec) == ((ino.mtime, ino.mtime_nsec) if ino.extended else (0, 0))
    with pytest.raises(FormatError, match="truncated"):
        Inode.unpack_fields(b"\x01" + bytes(40), 0)
    entries = [(b".", 36, 2), (b"..", 36, 2), (b"file", 1 << 40, 1), (b"n" * 255, 7, 7)]
    block = Dirent.pack_block(entries)
    one_by_one = b""
    nameoff = 12 * len(entries)
    for name, nid, ftype in entries:
        one_by_one += Dirent(nid, nameoff, ftype).pack()
        nameoff += len(name)
    assert block == one_by_one + b"".join(e[0] for e in entries)
    assert [Dirent(*d) for d in Dirent.unpack_block(block, 4)] == [
        Dirent.unpack(block, 12 * i) for i in range(4)
    ]


def test_device_numbers_use_the_kernels_encoding() -> None:
    for major, minor in [(0, 0), (1, 3), (8, 1), (240, 70_000), (4095, 0xFFFFF)]:
        assert decode_dev(encode_dev(major, minor)) == (major, minor)
    assert encode_dev(1, 3) == 0x103


@pytest.mark.parametrize("name", [b"system.foo", b"user.", b"os2.x", b"trusted."])
def test_xattr_names_without_an_erofs_prefix_are_refused(name: bytes) -> None:
    with pytest.raises(FormatError):
        split_xattr_name(name)


def test_superblock_magic_is_checked() -> None:
    with pytest.raises(FormatError, match="not an EROFS image"):
        SuperBlock.unpack(bytes(128))


def test_tail_packed_files_mount(tmp_path) -> None:
    """The writer's inline (tail-packing) layout for regular files: whole blocks in an
    extent, the last partial block right after the inode, never across a block boundary."""
    import os
    import stat

    from snapshotter.erofs.tree import InlineTail, Node
    from snapshotter.erofs.writer import DataWriter, ImageParams, header_blocks, write_metadata
    from tests.support.helpers import mounted_erofs

    path = tmp_path / "inline.erofs"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        data = DataWriter(fd, 4096, header_blocks(4096))
        root = Node.directory()
        contents = {}
        for i, size in enumerate([1, 100, 4095, 4097, 9000, 12287, 3000, 3000, 3000]):
            body = bytes([65 + i]) * size
            whole = size // 4096 * 4096
            head = data.add_blocks(body[:whole]) if whole else None
            name = f"f{i}".encode()
            root.children[name] = Node(
                mode=stat.S_IFREG | 0o644,
                size=size,
                data=InlineTail(head, body[whole:]),
                xattrs={b"user.k": b"v" * (i * 50)},
            )
            contents[name.decode()] = body
        write_metadata(data, root, ImageParams())
    finally:
        os.close(fd)
    with mounted_erofs(path) as mnt:
        for name, body in contents.items():
            assert (mnt / name).read_bytes() == body, name
