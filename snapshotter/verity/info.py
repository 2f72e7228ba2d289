"""What a formatted hash tree is, and how each consumer wants to be told about it.

- `table_line`: the device-mapper table a guest (or `dmsetup create`) activates.
- `kata_dm_verity`: Kata's `DmVerityInfo`, the `dm_verity` field of a KataVirtualVolume, in
  the one form all of Kata's readers turn into the same table (`DmVerityInfo` below is the
  only definition of that JSON in the project).
- `containerd_sidecar`: the `<blob>.dmverity` JSON containerd's erofs differ writes next to
  a layer blob and its erofs mount handler reads.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from snapshotter.errors import EpError, InvalidInput, Unsupported
from snapshotter.fsutil import write_atomic
from snapshotter.verity.geometry import tree_start_block
from snapshotter.verity.params import HASH_TYPE, VerityParams, parse_uuid

#: containerd's `dmverity.MetadataPath`: the sidecar is the blob's path plus this.
SIDECAR_SUFFIX = ".dmverity"
#: What Kata's runtime-go and image-rs accept (sha256, sha1) and we format.
KATA_HASH_NAMES = ("sha256",)
#: The digest lengths runtime-go and image-rs check (`validateHashType`, `validate`).
_KATA_HASH_HEX_LEN = {"sha256": 64, "sha1": 40}
#: Block sizes all of Kata's readers accept: powers of two from 512 to 512 KiB.
_KATA_MIN_BLOCK, _KATA_MAX_BLOCK = 1 << 9, 1 << 19


class KataVerityError(EpError):
    """Kata volume JSON Kata's readers refuse, or a tree they would not all read the same."""


@dataclass
class DmVerityInfo:
    """Kata's `DmVerityInfo` JSON: runtime-go's six fields (hashtype, hash, blocknum,
    blocksize, hashsize, offset) plus kata-types' `salt`, `hash_type` and `no_superblock`.

    What `offset` means depends on the reader (docs/kata.md): the tree start for runtime-go,
    image-rs and Kata's earlier agent; for kata-types the superblock unless `no_superblock`.
    `VerityInfo.kata_dm_verity` writes the one form they agree on. Parsing keeps keys it does
    not know (a newer runtime's) and writes them back unchanged.
    """

    hashtype: str
    hash: str
    blocknum: int
    blocksize: int
    hashsize: int
    offset: int
    salt: str = ""
    no_superblock: bool = False
    hash_type: int = HASH_TYPE
    extra: dict[str, Any] = field(default_factory=dict)

    _FIELDS = (
        "hashtype",
        "hash",
        "blocknum",
        "blocksize",
        "hashsize",
        "offset",
        "salt",
        "no_superblock",
        "hash_type",
    )

    def validate(self) -> None:
        """What every one of Kata's readers accepts (the strictest of their checks)."""
        want = _KATA_HASH_HEX_LEN.get(self.hashtype.lower())
        if want is None:
            raise KataVerityError(
                f"dm-verity: Kata does not accept hash algorithm "
                f"{self.hashtype!r} (only sha256, sha1)"
            )
        try:
            bytes.fromhex(self.hash)
        except ValueError:
            raise KataVerityError(f"dm-verity: root hash {self.hash!r} is not hex") from None
        if len(self.hash) != want:
            raise KataVerityError(f"dm-verity: {self.hashtype} root hash must be {want} hex digits")
        if not 0 <= self.offset < 1 << 64:
            raise KataVerityError(f"dm-verity: hash offset {self.offset} out of range")
        if not 0 < self.blocknum <= 0xFFFFFFFF:
            raise KataVerityError(f"dm-verity: block count {self.blocknum} out of range")
        for name in ("blocksize", "hashsize"):
            size = getattr(self, name)
            if not _KATA_MIN_BLOCK <= size <= _KATA_MAX_BLOCK or size & (size - 1):
                raise KataVerityError(
                    f"dm-verity: {name} {size} is not a power of two in 512..512K"
                )
        if self.offset % self.hashsize or self.offset < self.blocksize * self.blocknum:
            raise KataVerityError(
                f"dm-verity: hash offset {self.offset} must be hash-block aligned and past the data"
            )
        if self.hash_type != HASH_TYPE:
            raise KataVerityError(
                f"dm-verity: hash_type {self.hash_type}: Kata's earlier "
                f"readers load only format {HASH_TYPE}"
            )
        if self.salt:
            try:
                bytes.fromhex(self.salt)
            except ValueError:
                raise KataVerityError(f"dm-verity: salt {self.salt!r} is not hex") from None

    def to_json(self) -> dict[str, Any]:
        """Kata's serde form: `salt` only when set, `no_superblock` only when true,
        `hash_type` only when not kata-types' default."""
        out: dict[str, Any] = {
            "hashtype": self.hashtype,
            "hash": self.hash,
            "blocknum": self.blocknum,
            "blocksize": self.blocksize,
            "hashsize": self.hashsize,
            "offset": self.offset,
        }
        if self.salt:
            out["salt"] = self.salt
        if self.hash_type != HASH_TYPE:
            out["hash_type"] = self.hash_type
        if self.no_superblock:
            out["no_superblock"] = True
        return {**self.extra, **out}

    @classmethod
    def from_json(cls, data: Any) -> DmVerityInfo:
        if not isinstance(data, dict):
            raise KataVerityError("dm_verity must be a JSON object")
        try:
            salt = json_field(data, "salt", str, "", nullable=True)
            sizes = {
                k: json_field(data, k, int) for k in ("blocknum", "blocksize", "hashsize", "offset")
            }
            info = cls(
                hashtype=json_field(data, "hashtype", str),
                hash=json_field(data, "hash", str),
                **sizes,
                salt=salt or "",
                no_superblock=json_field(data, "no_superblock", bool, False),
                hash_type=json_field(data, "hash_type", int, HASH_TYPE),
                extra={k: v for k, v in data.items() if k not in cls._FIELDS},
            )
        except KeyError as exc:
            raise KataVerityError(f"dm_verity: missing field {exc.args[0]!r}") from None
        info.validate()
        return info


def json_field(
    data: dict[str, Any], key: str, kind: type, default: Any = KeyError, nullable: bool = False
) -> Any:
    """DATA[KEY] if it has JSON type KIND (a bool is no integer), else a clear error; a
    missing key (or null, when NULLABLE: serde's `Option`) gives DEFAULT or KeyError."""
    if key not in data or (nullable and data[key] is None):
        if default is KeyError:
            raise KeyError(key)
        return default
    value = data[key]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise KataVerityError(f"field {key!r} must be an integer, not {value!r}")
    if kind is not int and not isinstance(value, kind):
        raise KataVerityError(f"field {key!r} must be a {kind.__name__}, not {value!r}")
    return value


# A signed root manifest's verity entry for one device, in this order (`VerityInfo.signed_entry`).
SIGNED_ENTRY_FIELDS = (
    "root_hash",
    "salt",
    "hash_name",
    "data_block_size",
    "hash_block_size",
    "data_blocks",
    "hash_offset",
    "superblock",
)


@dataclass(frozen=True)
class VerityInfo:
    root_hash: str  # hex
    salt: str  # hex, "" for none
    hash_name: str
    data_block_size: int
    hash_block_size: int
    data_blocks: int
    hash_offset: int  # byte offset of the hash area: of the superblock if there is one
    superblock: bool
    uuid: str | None  # superblock UUID, None without a superblock

    @property
    def hash_start_block(self) -> int:
        """Where the tree starts on the hash device, in hash blocks (after the superblock)."""
        return tree_start_block(self.hash_offset, self.hash_block_size, self.superblock)

    @property
    def data_size(self) -> int:
        return self.data_blocks * self.data_block_size

    def params(self) -> VerityParams:
        return VerityParams(
            hash_name=self.hash_name,
            data_block_size=self.data_block_size,
            hash_block_size=self.hash_block_size,
            salt=bytes.fromhex(self.salt),
            unsalted=not self.salt,
            superblock=self.superblock,
            uuid=parse_uuid(self.uuid) if self.uuid else None,
        )

    def table_line(self, data_dev: str, hash_dev: str) -> str:
        """`<start> <sectors> verity 1 <data> <hash> <dbs> <hbs> <blocks> <hash_start> <alg>
        <root> <salt|->`, for `dmsetup create NAME --readonly --table "..."`."""
        return (
            f"0 {self.data_size // 512} verity {HASH_TYPE} {data_dev} {hash_dev} "
            f"{self.data_block_size} {self.hash_block_size} {self.data_blocks} "
            f"{self.hash_start_block} {self.hash_name} {self.root_hash} {self.salt or '-'}"
        )

    def kata_dm_verity(self, *, kata_types_only: bool = False) -> DmVerityInfo:
        """Kata's `DmVerityInfo` for this tree, read the same by all of Kata's readers.

        Data and tree share one device (Kata names the volume's source twice), so the tree
        must follow the data. `offset` is where the tree starts, with `no_superblock: true`:
        kata-types then starts the tree at `offset / hashsize`, and runtime-go, image-rs and
        Kata's earlier agent, which know neither field, at `ceil(offset / hashsize)`, the
        same block. Our superblock stays on disk; no reader needs it.

        Only sha256 trees (runtime-go and image-rs refuse sha512) and, unless
        KATA_TYPES_ONLY, only unsalted ones (`KATA_VERITY`): runtime-go's struct has no
        salt, and image-rs and the earlier agent always load `-`, so a salted tree would
        activate with a table that fails every read. KATA_TYPES_ONLY emits the salt for a
        runtime whose only reader is kata-types (runtime-rs with today's agent).
        """
        if self.hash_name not in KATA_HASH_NAMES:
            raise KataVerityError(
                f"Kata cannot read a {self.hash_name} dm-verity tree (runtime-go and image-rs "
                f"accept only {', '.join(KATA_HASH_NAMES)} of what we format)"
            )
        if self.salt and not kata_types_only:
            raise KataVerityError(
                "this dm-verity tree has a salt, which Kata's runtime-go, image-rs and earlier "
                "agent drop: build trees meant for Kata without one (KATA_VERITY), or ask "
                "for kata-types-only options"
            )
        start = self.hash_start_block * self.hash_block_size
        if start < self.data_size:
            raise KataVerityError(
                f"the hash tree starts at byte {start}, inside the {self.data_size} bytes of "
                "data: Kata needs the tree appended to the data on one device"
            )
        info = DmVerityInfo(
            hashtype=self.hash_name,
            hash=self.root_hash,
            blocknum=self.data_blocks,
            blocksize=self.data_block_size,
            hashsize=self.hash_block_size,
            offset=start,
            salt=self.salt if kata_types_only else "",
            no_superblock=True,
        )
        info.validate()
        return info

    def containerd_sidecar(self) -> dict[str, Any]:
        """The `<blob>.dmverity` JSON: containerd's `DmverityMetadata` (internal/dmverity), the
        root hash and the byte offset of the v1 superblock (not of the tree after it), plus
        `"salt": "-"` for an unsalted tree. containerd ignores that key; Kata runtime-rs'
        erofs path reads it, and without it opens an unsalted tree with containerd's default
        salt (32 zero bytes), a table that fails every read (docs/kata.md, "Salt")."""
        sidecar: dict[str, Any] = {"roothash": self.root_hash, "hashoffset": self.hash_offset}
        if not self.salt:
            sidecar["salt"] = "-"
        return sidecar

    def write_containerd_sidecar(self, blob_path: str | os.PathLike[str]) -> Path:
        """Write `<blob>.dmverity` byte for byte as containerd's erofs differ does
        (`dmverity.FormatLayer`: Go's MarshalIndent, two spaces, no trailing newline),
        atomically: temp file, fsync, rename. The one writer of sidecars in the project."""
        if not self.superblock:
            # containerd opens the device by reading the superblock at hashoffset.
            raise Unsupported("containerd's .dmverity sidecar needs a tree with a superblock")
        path = Path(str(blob_path) + SIDECAR_SUFFIX)
        write_atomic(path, json.dumps(self.containerd_sidecar(), indent=2).encode())
        return path

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["hash_type"] = HASH_TYPE
        out["hash_start_block"] = self.hash_start_block
        return out

    def signed_entry(self) -> dict[str, Any]:
        """The device's entry in a signed root manifest: what a guest needs to open the tree
        (no UUID: a guest never checks it). `from_signed_entry` reads it back."""
        return {name: getattr(self, name) for name in SIGNED_ENTRY_FIELDS}

    @classmethod
    def from_signed_entry(cls, entry: dict[str, Any]) -> VerityInfo:
        """Only the signed fields count (others, such as a description's derived ones, are
        ignored); a missing one is an error, never a default."""
        if not isinstance(entry, dict):
            raise InvalidInput("a signed verity entry must be a JSON object")
        missing = [name for name in SIGNED_ENTRY_FIELDS if name not in entry]
        if missing:
            raise InvalidInput(f"signed verity entry without {', '.join(missing)}")
        return cls.from_json({**{name: entry[name] for name in SIGNED_ENTRY_FIELDS}, "uuid": None})

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> VerityInfo:
        try:
            info = cls(
                root_hash=str(obj["root_hash"]),
                salt=str(obj["salt"]),
                hash_name=str(obj["hash_name"]),
                data_block_size=int(obj["data_block_size"]),
                hash_block_size=int(obj["hash_block_size"]),
                data_blocks=int(obj["data_blocks"]),
                hash_offset=int(obj["hash_offset"]),
                superblock=bool(obj["superblock"]),
                uuid=obj.get("uuid"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInput(f"not a verity description: {exc}") from None
        info.params().validate()
        return info
