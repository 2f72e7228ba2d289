"""What a formatted hash tree is, and how each consumer wants to be told about it.

- `table_line`: the device-mapper table a guest (or `dmsetup create`) activates.
- `kata_dm_verity`: Kata's `DmVerityInfo` (kata-types `mount.rs`), the `dm_verity` field of a
  KataVirtualVolume.
- `containerd_sidecar`: the `<blob>.dmverity` JSON containerd's erofs differ writes next to
  a layer blob and its erofs mount handler reads.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from snapshotter.errors import EpError
from snapshotter.fsutil import write_atomic
from snapshotter.verity.geometry import tree_start_block
from snapshotter.verity.params import HASH_TYPE, VerityParams, parse_uuid


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

    def kata_dm_verity(self) -> dict[str, Any]:
        """Kata's DmVerityInfo as JSON.

        `offset` is the byte offset of the hash area on the hash device, i.e. of the superblock
        when there is one: Kata's agent computes the tree start as `offset / hashsize +
        ceil(512 / hashsize)` with a superblock and `offset / hashsize` without, which equals
        our `hash_start_block` for every 512-aligned offset. `hash_type` is the dm-verity
        format version (1); `hashtype` is the algorithm. `salt` is omitted when empty (Kata
        then passes `-`). Kata's multi-layer EROFS path also derives `blocknum` as
        `offset / blocksize`, which holds for our appended layout.
        """
        out: dict[str, Any] = {
            "hashtype": self.hash_name,
            "hash": self.root_hash,
            "blocknum": self.data_blocks,
            "blocksize": self.data_block_size,
            "hashsize": self.hash_block_size,
            "offset": self.hash_offset,
        }
        if self.salt:
            out["salt"] = self.salt
        out["hash_type"] = HASH_TYPE
        out["no_superblock"] = not self.superblock
        return out

    def containerd_sidecar(self) -> dict[str, Any]:
        """containerd's `DmverityMetadata`: root hash and the superblock's byte offset."""
        return {"roothash": self.root_hash, "hashoffset": self.hash_offset}

    def write_containerd_sidecar(self, blob_path: str | os.PathLike[str]) -> Path:
        """Write `<blob>.dmverity` byte for byte as containerd does (Go's MarshalIndent, two
        spaces, no trailing newline), atomically: temp file, fsync, rename."""
        if not self.superblock:
            # containerd opens the device by reading the superblock at hashoffset.
            raise EpError("containerd's .dmverity sidecar needs a tree with a superblock")
        path = Path(str(blob_path) + ".dmverity")
        write_atomic(path, json.dumps(self.containerd_sidecar(), indent=2).encode())
        return path

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["hash_type"] = HASH_TYPE
        out["hash_start_block"] = self.hash_start_block
        return out

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
            raise EpError(f"not a verity description: {exc}") from None
        info.params().validate()
        return info
