"""The 512-byte v1 verity superblock that `veritysetup format` writes at the hash offset.

Layout (little-endian, as cryptsetup's `struct verity_sb`):

| offset | size | field |
|---|---|---|
| 0 | 8 | signature `verity\\0\\0` |
| 8 | 4 | version = 1 |
| 12 | 4 | hash_type (1 = normal) |
| 16 | 16 | uuid |
| 32 | 32 | algorithm name, NUL padded |
| 64 | 4 | data_block_size |
| 68 | 4 | hash_block_size |
| 72 | 8 | data_blocks |
| 80 | 2 | salt_size |
| 82 | 6 | padding |
| 88 | 256 | salt, zero padded |
| 344 | 168 | padding |

The hash tree itself starts at the first hash block boundary after the superblock's 512 bytes.
The kernel never reads the superblock; veritysetup (and containerd's go-dmverity) read it to
get the geometry when opening a device.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from snapshotter.errors import CorruptImage, InvalidArgument, Unsupported
from snapshotter.verity.params import MAX_SALT_SIZE, uuid_text

SUPERBLOCK_SIZE = 512
SIGNATURE = b"verity\0\0"
VERSION = 1

_HEADER = struct.Struct("<8sII16s32sIIQH6x")  # up to the salt (88 bytes)
assert _HEADER.size == 88


@dataclass(frozen=True)
class VeritySuperblock:
    hash_type: int
    uuid: bytes
    algorithm: str
    data_block_size: int
    hash_block_size: int
    data_blocks: int
    salt: bytes

    def serialize(self) -> bytes:
        name = self.algorithm.encode("ascii")
        if len(name) > 32:
            raise InvalidArgument(f"hash algorithm name {self.algorithm!r} is longer than 32 bytes")
        if len(self.salt) > MAX_SALT_SIZE:
            raise InvalidArgument(f"salt of {len(self.salt)} bytes does not fit the superblock")
        if len(self.uuid) != 16:
            raise InvalidArgument("superblock UUID must be 16 bytes")
        head = _HEADER.pack(
            SIGNATURE,
            VERSION,
            self.hash_type,
            bytes(self.uuid),
            name,
            self.data_block_size,
            self.hash_block_size,
            self.data_blocks,
            len(self.salt),
        )
        salt = bytes(self.salt).ljust(MAX_SALT_SIZE, b"\0")
        return (head + salt).ljust(SUPERBLOCK_SIZE, b"\0")

    @classmethod
    def deserialize(cls, raw: bytes) -> VeritySuperblock:
        if len(raw) < SUPERBLOCK_SIZE:
            raise CorruptImage(
                f"verity superblock truncated: {len(raw)} of {SUPERBLOCK_SIZE} bytes"
            )
        (sig, version, hash_type, uuid, name, dbs, hbs, blocks, salt_size) = _HEADER.unpack_from(
            raw
        )
        if sig != SIGNATURE:
            raise CorruptImage("no verity superblock there (signature mismatch)")
        if version != VERSION:
            raise Unsupported(f"unsupported verity superblock version {version}")
        if salt_size > MAX_SALT_SIZE:
            raise CorruptImage(f"verity superblock corrupted: salt size {salt_size}")
        return cls(
            hash_type=hash_type,
            uuid=uuid,
            algorithm=name.rstrip(b"\0").decode("ascii", "replace"),
            data_block_size=dbs,
            hash_block_size=hbs,
            data_blocks=blocks,
            salt=bytes(raw[_HEADER.size : _HEADER.size + salt_size]),
        )

    @property
    def uuid_text(self) -> str:
        return uuid_text(self.uuid)
