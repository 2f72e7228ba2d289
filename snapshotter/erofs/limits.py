"""Ceilings on what one layer may make a conversion spend.

A tar declares sizes, counts and names before it delivers any of them; a few kilobytes can
claim a petabyte file or a path of a million components. Every declared quantity is checked
against these ceilings *before* anything is allocated or read for it, so memory stays bounded
by the metadata actually present and time by the data actually present.

`Limits()` holds the defaults the service uses; a caller (the differ, the CLI, a test) passes
its own with `limits=` to `convert_layer` / `import_tar` / `TarReader`. Exceeding a ceiling
is an `EpError` naming it.

The constants below are not configurable: they are what Linux or the EROFS format can
represent, and a layer beyond them cannot be unpacked faithfully by anyone.
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 1 << 30

# Linux PATH_MAX is 4096 bytes including the terminating NUL: symlink(2) refuses longer
# targets with ENAMETOOLONG, so containerd's applier cannot create them either.
SYMLINK_TARGET_MAX = 4095
# EROFS stores device numbers as Linux `new_encode_dev` (u32): 12-bit major, 20-bit minor.
# A larger number would silently become another device (4096:0 encodes as 0:0, a whiteout).
DEV_MAJOR_MAX = 0xFFF
DEV_MINOR_MAX = 0xFFFFF
# The kernel's s_maxbytes for EROFS (MAX_LFS_FILESIZE): no file may claim more.
FILE_SIZE_MAX = (1 << 63) - 1
# Extended inodes keep a signed 64-bit mtime.
MTIME_MIN, MTIME_MAX = -(1 << 63), (1 << 63) - 1
# An xattr entry has a u8 name length and a u16 value size; an inode's shared xattr count is
# a u8 and its inline xattr area is counted in 4-byte units by a u16.
XATTR_NAME_MAX = 255
XATTR_VALUE_MAX = 0xFFFF
XATTRS_PER_FILE_MAX = 255
XATTR_INLINE_MAX = (0xFFFF - 1) * 4


@dataclass(frozen=True)
class Limits:
    """Per-layer ceilings. Defaults suit a containerd differ pulling untrusted images.

    - `max_tar_bytes`: decompressed tar bytes read, trailing padding included (a
      decompression bomb stops here, not when the disk is full).
    - `max_image_bytes`: bytes of the EROFS image written (data and metadata); bounds what
      sparse files expand to, as their holes are free but data chunks are whole chunks.
    - `max_entries`: tar members that become inodes or directory entries.
    - `max_metadata_bytes`: memory the inode tree may take: names, link targets, xattrs,
      chunk indexes, plus a fixed cost per inode (implicit parent directories included).
    - `max_sparse_overhead_bytes`: what the holes of the layer's sparse files may cost in
      all: their chunk indexes (counted at 32 bytes each) plus the zeros stored around data
      in the chunks that hold any (EROFS stores such a chunk whole). A few data runs in a
      file of size S cost about sqrt(S) at best; this is what bounds a 1.5 KB tar declaring
      a huge sparse file (1 PiB with a few runs costs ~0.45 GB; 2^60 bytes is refused).
    - `max_header_bytes`: one extension header (a PAX header, a GNU long name or link, a
      sparse map), as Go's archive/tar (1 MiB) bounds them.
    - `max_path_bytes`: one member path (after PAX/GNU long names), in bytes.
    - `max_path_depth`: components of one member path.
    """

    max_tar_bytes: int = 256 * GiB
    max_image_bytes: int = 256 * GiB
    max_entries: int = 1_000_000
    max_metadata_bytes: int = 1 * GiB
    max_sparse_overhead_bytes: int = 1 * GiB
    max_header_bytes: int = 1 << 20
    max_path_bytes: int = 4095
    max_path_depth: int = 1024

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"limit {name} must be a positive integer, not {value!r}")


DEFAULT_LIMITS = Limits()
