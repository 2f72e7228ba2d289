"""Kata's `KataVirtualVolume`, as the `io.katacontainers.volume=<base64 JSON>` mount option
nydus-snapshotter's tarfs mode hands to Kata, and its making from our VM-mode mounts.

Field names, types and omission rules follow Kata's `kata-types` (`mount.rs`, serde with
`skip_serializing_if` on empty values) and nydus-snapshotter's Go twin. Parsing keeps fields it
does not know (a newer runtime's) and writes them back unchanged.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any

from snapshotter.errors import EpError

KATA_VOLUME_OPTION = "io.katacontainers.volume"
DIRECT_BLOCK = "direct_block"
IMAGE_RAW_BLOCK = "image_raw_block"
LAYER_RAW_BLOCK = "layer_raw_block"
IMAGE_NYDUS_BLOCK = "image_nydus_block"
LAYER_NYDUS_BLOCK = "layer_nydus_block"
IMAGE_NYDUS_FS = "image_nydus_fs"
LAYER_NYDUS_FS = "layer_nydus_fs"
IMAGE_GUEST_PULL = "image_guest_pull"

_HASH_HEX_LEN = {"sha256": 64, "sha1": 40, "sha512": 128}
_MIN_BLOCK, _MAX_BLOCK = 1 << 9, 1 << 19


@dataclass
class DmVerityInfo:
    """Kata's DmVerityInfo: `offset` is the byte offset of the hash area (of the v1
    superblock when there is one) on the hash device, which for our blobs is the blob itself."""

    hashtype: str
    hash: str
    blocknum: int
    blocksize: int
    hashsize: int
    offset: int
    salt: str = ""
    no_superblock: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    _FIELDS = ("hashtype", "hash", "blocknum", "blocksize", "hashsize", "offset", "salt",
               "no_superblock")

    def validate(self) -> None:
        """The checks Kata and nydus-snapshotter apply, with clear messages."""
        want = _HASH_HEX_LEN.get(self.hashtype.lower())
        if want is None:
            raise EpError(f"dm-verity: unsupported hash algorithm {self.hashtype!r}")
        try:
            bytes.fromhex(self.hash)
        except ValueError:
            raise EpError(f"dm-verity: root hash {self.hash!r} is not hex") from None
        if len(self.hash) != want:
            raise EpError(f"dm-verity: {self.hashtype} root hash must be {want} hex digits")
        if not 0 < self.blocknum <= 0xFFFFFFFF:
            raise EpError(f"dm-verity: block count {self.blocknum} out of range")
        for name in ("blocksize", "hashsize"):
            size = getattr(self, name)
            if not _MIN_BLOCK <= size <= _MAX_BLOCK or size & (size - 1):
                raise EpError(f"dm-verity: {name} {size} is not a power of two in 512..512K")
        if self.offset % self.hashsize or self.offset < self.blocksize * self.blocknum:
            raise EpError(f"dm-verity: hash offset {self.offset} must be hash-block aligned "
                          "and past the data")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "hashtype": self.hashtype, "hash": self.hash, "blocknum": self.blocknum,
            "blocksize": self.blocksize, "hashsize": self.hashsize, "offset": self.offset,
        }
        if self.salt:
            out["salt"] = self.salt
        if self.no_superblock:
            out["no_superblock"] = True
        return {**self.extra, **out}

    @classmethod
    def from_json(cls, data: Any) -> DmVerityInfo:
        if not isinstance(data, dict):
            raise EpError("dm_verity must be a JSON object")
        try:
            info = cls(
                hashtype=_typed(data, "hashtype", str), hash=_typed(data, "hash", str),
                blocknum=_typed(data, "blocknum", int), blocksize=_typed(data, "blocksize", int),
                hashsize=_typed(data, "hashsize", int), offset=_typed(data, "offset", int),
                salt=_typed(data, "salt", str, ""),
                no_superblock=_typed(data, "no_superblock", bool, False),
                extra={k: v for k, v in data.items() if k not in cls._FIELDS},
            )
        except KeyError as exc:
            raise EpError(f"dm_verity: missing field {exc.args[0]!r}") from None
        info.validate()
        return info

    @classmethod
    def from_verity_json(cls, v: dict[str, Any]) -> DmVerityInfo:
        """From `snapshotter.verity.VerityInfo.to_json()` / our devices description."""
        return cls(
            hashtype=v.get("hash_name", "sha256"), hash=v["root_hash"],
            blocknum=v["data_blocks"], blocksize=v.get("data_block_size", 4096),
            hashsize=v.get("hash_block_size", 4096), offset=v["hash_offset"],
            salt=v.get("salt", ""), no_superblock=not v.get("superblock", True),
        )


def _typed(data: dict, key: str, kind: type, default: Any = KeyError) -> Any:
    if key not in data:
        if default is KeyError:
            raise KeyError(key)
        return default
    value = data[key]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise EpError(f"field {key!r} must be an integer, not {value!r}")
    if kind is not int and not isinstance(value, kind):
        raise EpError(f"field {key!r} must be a {kind.__name__}, not {value!r}")
    return value


@dataclass
class KataVirtualVolume:
    volume_type: str
    source: str = ""
    fs_type: str = ""
    options: list[str] = field(default_factory=list)
    direct_volume: dict[str, Any] | None = None
    image_pull: dict[str, Any] | None = None
    nydus_image: dict[str, Any] | None = None
    dm_verity: DmVerityInfo | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    _FIELDS = ("volume_type", "source", "fs_type", "options", "direct_volume", "image_pull",
               "nydus_image", "dm_verity")

    def validate(self) -> None:
        """Kata's `KataVirtualVolume::validate`, for the types this project produces and
        reads; other types are passed through."""
        if self.volume_type in (DIRECT_BLOCK, IMAGE_RAW_BLOCK, LAYER_RAW_BLOCK):
            if not self.source:
                raise EpError(f"{self.volume_type} volume: missing source")
            if not self.fs_type:
                raise EpError(f"{self.volume_type} volume: missing fs_type")
        elif self.volume_type == IMAGE_GUEST_PULL and not self.source:
            raise EpError("image_guest_pull volume: missing image reference")
        elif not self.volume_type:
            raise EpError("volume without volume_type")
        if self.dm_verity is not None:
            self.dm_verity.validate()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.extra)
        out["volume_type"] = self.volume_type
        for key in ("source", "fs_type"):
            if getattr(self, key):
                out[key] = getattr(self, key)
        if self.options:
            out["options"] = list(self.options)
        for key in ("direct_volume", "image_pull", "nydus_image"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.dm_verity is not None:
            out["dm_verity"] = self.dm_verity.to_json()
        return out

    @classmethod
    def from_json(cls, data: Any) -> KataVirtualVolume:
        if not isinstance(data, dict):
            raise EpError("a Kata volume must be a JSON object")
        try:
            options = _typed(data, "options", list, [])
            if not all(isinstance(o, str) for o in options):
                raise EpError("field 'options' must be a list of strings")
            volume = cls(
                volume_type=_typed(data, "volume_type", str),
                source=_typed(data, "source", str, ""),
                fs_type=_typed(data, "fs_type", str, ""),
                options=options,
                direct_volume=_typed(data, "direct_volume", dict, None),
                image_pull=_typed(data, "image_pull", dict, None),
                nydus_image=_typed(data, "nydus_image", dict, None),
                dm_verity=(DmVerityInfo.from_json(data["dm_verity"])
                           if data.get("dm_verity") is not None else None),
                extra={k: v for k, v in data.items() if k not in cls._FIELDS},
            )
        except KeyError as exc:
            raise EpError(f"Kata volume: missing field {exc.args[0]!r}") from None
        volume.validate()
        return volume

    def to_option(self) -> str:
        """`io.katacontainers.volume=<base64 of the compact JSON>`."""
        self.validate()
        raw = json.dumps(self.to_json(), separators=(",", ":")).encode()
        return f"{KATA_VOLUME_OPTION}={base64.b64encode(raw).decode()}"

    @classmethod
    def from_option(cls, option: str) -> KataVirtualVolume:
        prefix = KATA_VOLUME_OPTION + "="
        if not option.startswith(prefix):
            raise EpError(f"not a Kata volume option: {option[:40]!r}")
        try:
            raw = base64.b64decode(option[len(prefix):], validate=True)
        except (binascii.Error, ValueError):
            raise EpError("Kata volume option: bad base64") from None
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise EpError(f"Kata volume option: bad JSON ({exc})") from None
        return cls.from_json(data)


def volumes_from_devices(devices: list[dict[str, Any]], flat: dict[str, Any] | None = None
                         ) -> list[KataVirtualVolume]:
    """Kata volumes for a VM-mode rootfs: from the device list our snapshotter's VM-mode
    mount carries (fsmeta first, then each layer in device-table order), or from one flat
    image. Each device is its own hash device, its tree appended (offset = hash_offset).
    The volumes' order is the device order: the fsmeta, then device 1, 2, ..."""
    if flat is not None:
        return [KataVirtualVolume(
            volume_type=IMAGE_RAW_BLOCK, source=flat["path"], fs_type="erofs", options=["ro"],
            dm_verity=DmVerityInfo.from_verity_json(flat["verity"]))]
    volumes = []
    for dev in devices:
        is_fsmeta = dev.get("role") == "fsmeta"
        volumes.append(KataVirtualVolume(
            volume_type=IMAGE_RAW_BLOCK if is_fsmeta else LAYER_RAW_BLOCK,
            source=dev["path"], fs_type="erofs", options=["ro"],
            dm_verity=DmVerityInfo.from_verity_json(dev["verity"]),
        ))
    return volumes
