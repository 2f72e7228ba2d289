"""Kata's `KataVirtualVolume`, as the `io.katacontainers.volume=<base64 JSON>` mount option
nydus-snapshotter's tarfs mode hands to Kata, and its making from our VM-mode mounts.

Field names, types and omission rules follow Kata's `kata-types` (`mount.rs`, serde with
`skip_serializing_if` on empty values) and nydus-snapshotter's Go twin. Parsing keeps fields it
does not know (a newer runtime's) and writes them back unchanged. The `dm_verity` part is
`snapshotter.verity.info.DmVerityInfo`, made only by `VerityInfo.kata_dm_verity`.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any

from snapshotter.errors import InvalidInput
from snapshotter.verity.info import DmVerityInfo, KataVerityError, VerityInfo, json_field

KATA_VOLUME_OPTION = "io.katacontainers.volume"
DIRECT_BLOCK = "direct_block"
IMAGE_RAW_BLOCK = "image_raw_block"
LAYER_RAW_BLOCK = "layer_raw_block"
IMAGE_NYDUS_BLOCK = "image_nydus_block"
LAYER_NYDUS_BLOCK = "layer_nydus_block"
IMAGE_NYDUS_FS = "image_nydus_fs"
LAYER_NYDUS_FS = "layer_nydus_fs"
IMAGE_GUEST_PULL = "image_guest_pull"


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

    _FIELDS = (
        "volume_type",
        "source",
        "fs_type",
        "options",
        "direct_volume",
        "image_pull",
        "nydus_image",
        "dm_verity",
    )

    def validate(self) -> None:
        """Kata's `KataVirtualVolume::validate`, for the types this project produces and
        reads; other types are passed through."""
        if self.volume_type in (DIRECT_BLOCK, IMAGE_RAW_BLOCK, LAYER_RAW_BLOCK):
            if not self.source:
                raise InvalidInput(f"{self.volume_type} volume: missing source")
            if not self.fs_type:
                raise InvalidInput(f"{self.volume_type} volume: missing fs_type")
        elif self.volume_type == IMAGE_GUEST_PULL and not self.source:
            raise InvalidInput("image_guest_pull volume: missing image reference")
        elif not self.volume_type:
            raise InvalidInput("volume without volume_type")
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
            raise InvalidInput("a Kata volume must be a JSON object")
        try:
            options = json_field(data, "options", list, [])
            if not all(isinstance(o, str) for o in options):
                raise InvalidInput("field 'options' must be a list of strings")
            volume = cls(
                volume_type=json_field(data, "volume_type", str),
                source=json_field(data, "source", str, ""),
                fs_type=json_field(data, "fs_type", str, ""),
                options=options,
                direct_volume=json_field(data, "direct_volume", dict, None),
                image_pull=json_field(data, "image_pull", dict, None),
                nydus_image=json_field(data, "nydus_image", dict, None),
                dm_verity=(
                    DmVerityInfo.from_json(data["dm_verity"])
                    if data.get("dm_verity") is not None
                    else None
                ),
                extra={k: v for k, v in data.items() if k not in cls._FIELDS},
            )
        except KeyError as exc:
            raise InvalidInput(f"Kata volume: missing field {exc.args[0]!r}") from None
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
            raise InvalidInput(f"not a Kata volume option: {option[:40]!r}")
        try:
            raw = base64.b64decode(option[len(prefix) :], validate=True)
        except (binascii.Error, ValueError):
            raise InvalidInput("Kata volume option: bad base64") from None
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"Kata volume option: bad JSON ({exc})") from None
        return cls.from_json(data)


def volumes_from_devices(
    devices: list[dict[str, Any]],
    flat: dict[str, Any] | None = None,
    *,
    kata_types_only: bool = False,
) -> list[KataVirtualVolume]:
    """Kata volumes for a VM-mode rootfs: from the device list our snapshotter's VM-mode
    mount carries (fsmeta first, then each layer in device-table order), or from one flat
    image. Each device is its own hash device, its tree appended. The volumes' order is the
    device order: the fsmeta, then device 1, 2, ...

    Every tree must be sha256 and, unless KATA_TYPES_ONLY, unsalted
    (`VerityInfo.kata_dm_verity`): a KataVerityError names the device that is not."""
    if flat is not None:
        return [
            KataVirtualVolume(
                volume_type=IMAGE_RAW_BLOCK,
                source=flat["path"],
                fs_type="erofs",
                options=["ro"],
                dm_verity=_kata_dm_verity(flat, kata_types_only),
            )
        ]
    volumes = []
    for dev in devices:
        is_fsmeta = dev.get("role") == "fsmeta"
        volumes.append(
            KataVirtualVolume(
                volume_type=IMAGE_RAW_BLOCK if is_fsmeta else LAYER_RAW_BLOCK,
                source=dev["path"],
                fs_type="erofs",
                options=["ro"],
                dm_verity=_kata_dm_verity(dev, kata_types_only),
            )
        )
    return volumes


def _kata_dm_verity(device: dict[str, Any], kata_types_only: bool) -> DmVerityInfo:
    try:
        return VerityInfo.from_json(device["verity"]).kata_dm_verity(
            kata_types_only=kata_types_only
        )
    except KataVerityError as exc:
        raise KataVerityError(f"{device['path']}: {exc}") from None
