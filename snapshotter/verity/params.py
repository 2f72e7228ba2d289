"""What a dm-verity device is formatted with, and the deterministic salt and UUID.

Only hash format 1 ("normal", what `veritysetup format` writes by default and what the kernel's
`verity 1` table version means) exists here: each hash is H(salt || block).
"""

from __future__ import annotations

import hashlib
import uuid as uuidlib
from dataclasses import dataclass

from snapshotter.errors import InvalidArgument, InvalidInput, Unsupported

#: dm-verity on-disk hash format; 0 is the old Chrome OS one (salt after the data).
HASH_TYPE = 1

MIN_BLOCK_SIZE = 512
#: The guest kernel cannot activate data blocks bigger than its page size.
MAX_BLOCK_SIZE = 4096
#: The v1 superblock's salt field is 256 bytes; cryptsetup refuses longer salts.
MAX_SALT_SIZE = 256

#: Algorithms we format with. Others (sha384, sha1) would work the same way, but neither
#: containerd nor Kata uses them, so they stay out until something needs them.
HASH_NAMES = ("sha256", "sha512")

_SALT_DOMAIN = b"erofs-passthrough dm-verity salt v1\0"
_LAYER_SALT_DOMAIN = b"erofs-passthrough dm-verity layer salt v2\0"
_UUID_DOMAIN = b"erofs-passthrough dm-verity uuid v1\0"


def digest_size(hash_name: str) -> int:
    return hashlib.new(hash_name).digest_size


@dataclass(frozen=True)
class VerityParams:
    """Geometry and salt of one dm-verity hash tree (veritysetup's `format` options)."""

    hash_name: str = "sha256"
    data_block_size: int = 4096
    hash_block_size: int = 4096
    salt: bytes = b""
    superblock: bool = True
    uuid: bytes | None = None  # 16 bytes; None -> derived from root hash and salt on finish
    #: No salt, not even the one a layer conversion derives (`derive_layer_salt`) when `salt`
    #: is empty: a tree meant for Kata, whose runtime-go and older readers carry no salt.
    unsalted: bool = False

    def validate(self) -> None:
        if self.hash_name not in HASH_NAMES:
            raise Unsupported(
                f"unsupported dm-verity hash {self.hash_name!r} (choose {', '.join(HASH_NAMES)})"
            )
        for what, size in (
            ("data block size", self.data_block_size),
            ("hash block size", self.hash_block_size),
        ):
            if (
                not isinstance(size, int)
                or size < MIN_BLOCK_SIZE
                or size > MAX_BLOCK_SIZE
                or size & (size - 1)
            ):
                raise InvalidArgument(
                    f"dm-verity {what} {size} must be a power of two from "
                    f"{MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}"
                )
        if not isinstance(self.salt, bytes | bytearray):
            raise InvalidArgument("dm-verity salt must be bytes")
        if len(self.salt) > MAX_SALT_SIZE:
            raise InvalidArgument(
                f"dm-verity salt is {len(self.salt)} bytes, at most {MAX_SALT_SIZE} allowed"
            )
        if self.unsalted and self.salt:
            raise InvalidArgument("dm-verity parameters ask for an unsalted tree but give a salt")
        if self.uuid is not None:
            if not self.superblock:
                raise InvalidArgument(
                    "a dm-verity UUID needs the superblock (it is stored only there)"
                )
            if not isinstance(self.uuid, bytes | bytearray) or len(self.uuid) != 16:
                raise InvalidArgument("dm-verity UUID must be 16 bytes")

    @property
    def digest_size(self) -> int:
        return digest_size(self.hash_name)


#: containerd's geometry (sha256, 4096/4096, v1 superblock) without a salt: the tree of a blob
#: meant for Kata, whose readers then all load the same table (docs/kata.md). The signed
#: manifest binds the root hash either way; a salt only makes precomputed trees useless.
KATA_VERITY = VerityParams(unsalted=True)


def parse_digest(digest: bytes | str) -> bytes:
    """A sha256 digest as raw bytes, from raw bytes, hex, or `sha256:<hex>`."""
    if isinstance(digest, bytes | bytearray):
        raw = bytes(digest)
    else:
        text = digest.strip()
        if text.startswith("sha256:"):
            text = text[len("sha256:") :]
        elif ":" in text:
            raise Unsupported(f"only sha256 digests can seed a dm-verity salt, got {digest!r}")
        try:
            raw = bytes.fromhex(text)
        except ValueError:
            raise InvalidArgument(f"not a hex sha256 digest: {digest!r}") from None
    if len(raw) != 32:
        raise InvalidArgument(f"a sha256 digest has 32 bytes, got {len(raw)}")
    return raw


def derive_salt(digest: bytes | str) -> bytes:
    """The default 32-byte salt of a blob: sha256(domain || blob's sha256 digest).

    Same blob, same salt, same root hash: a layer converted twice (or on two machines) gets
    an identical verity tree, while two different blobs never share a salt. The domain
    string keeps the salt from being the blob digest itself.
    """
    return hashlib.sha256(_SALT_DOMAIN + parse_digest(digest)).digest()


def derive_layer_salt(fs_uuid: bytes, fallback_digest: bytes | str | None = None) -> bytes:
    """The default 32-byte salt of an EROFS layer's tree: sha256(domain || the image's UUID).

    The UUID is the EROFS superblock's, so the salt is a function of the image bytes alone: a
    tar converted here (whose UUID is UUIDv5 of its diffID, known before a byte is written)
    and the same image arriving as a native EROFS layer get the same salt, and so the same
    root. An image without a UUID (all zero bytes: mkfs.erofs `-U` with the nil UUID, other
    writers) is salted as any blob, with `derive_salt(fallback_digest)`, its sha256 digest.
    """
    raw = bytes(fs_uuid)
    if len(raw) != 16:
        raise InvalidInput(f"an EROFS UUID has 16 bytes, got {len(raw)}")
    if any(raw):
        return hashlib.sha256(_LAYER_SALT_DOMAIN + raw).digest()
    if fallback_digest is None:
        raise InvalidArgument("an EROFS image without a UUID needs its digest to derive a salt")
    return derive_salt(fallback_digest)


def derive_uuid(hash_name: str, root_digest: bytes, salt: bytes) -> bytes:
    """The superblock UUID when none is given: an RFC 9562 version-8 UUID from the tree.

    The first 16 bytes of sha256(domain || hash name || NUL || root digest || salt), with
    the version and variant bits set. Reformatting the same data gives the same bytes,
    unlike veritysetup's random UUID.
    """
    raw = bytearray(
        hashlib.sha256(_UUID_DOMAIN + hash_name.encode() + b"\0" + root_digest + salt).digest()[:16]
    )
    raw[6] = (raw[6] & 0x0F) | 0x80  # version 8: custom
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC variant
    return bytes(raw)


def uuid_text(raw: bytes) -> str:
    return str(uuidlib.UUID(bytes=bytes(raw)))


def parse_uuid(text: str) -> bytes:
    try:
        return uuidlib.UUID(text).bytes
    except ValueError:
        raise InvalidArgument(f"not a UUID: {text!r}") from None


def parse_salt(text: str) -> bytes:
    """A salt as veritysetup takes it: hex, or `-` for none."""
    if text in ("-", ""):
        return b""
    try:
        salt = bytes.fromhex(text)
    except ValueError:
        raise InvalidArgument(f"salt must be hex digits (or - for none), got {text!r}") from None
    if len(salt) > MAX_SALT_SIZE:
        raise InvalidArgument(
            f"dm-verity salt is {len(salt)} bytes, at most {MAX_SALT_SIZE} allowed"
        )
    return salt
