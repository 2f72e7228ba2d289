"""A chain's VM device list (`fsmeta.json`) and the mount option that names it.

A VM-mode snapshot's one mount (type `fuse.erofs-passthrough-mount`, source the chain's
`image.fsmeta`) carries, instead of one option per layer, the path of the chain's description:
every device in device order (the fsmeta, then device 1, 2, ... of its device table), each
with its dm-verity description (`snapshotter.verity.VerityInfo`). The service writes it once
per chain (`snapshotter.service.vm_mode`); the mount program, the shim and `manifest verify`
read it. This module is that contract's one definition: the dataclasses with their JSON
(`to_json` / `from_json`, side by side), the mount option's encoding and decoding, and the
checked read of the file a mount names.

    {"fsmeta": {"role": "fsmeta", "path", "size", "digest", "root_hash", "verity"},
     "layers": [{"role": "layer", "device": i, "path", "size", "tag", "blocks", "uniaddr",
                 "digest", "diff_id", "root_hash", "verity"}, ...],
     "manifest": {"path", "signature", "key_id"}}          # when the node signs

Parsing refuses, in one line, anything else: a wrong type, a negative size, a root hash that
is not its tree's, devices out of order, more devices than EROFS addresses.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from snapshotter.errors import EpError, InvalidArgument, InvalidInput
from snapshotter.verity import VerityInfo

if TYPE_CHECKING:
    from snapshotter.fsmeta.merge import MergeResult

__all__ = [
    "DESCRIPTION",
    "DESCRIPTION_OPTION",
    "FSMETA",
    "MOUNT_PROGRAM",
    "MOUNT_TYPE",
    "OPTION_PREFIX",
    "ChainDescription",
    "ChainDevice",
    "DeviceListError",
    "LayerImage",
    "decode_description_option",
    "describe_merge",
    "device_list_roots",
    "encode_description_option",
    "read_description",
    "read_mounted_description",
]

#: The mount program mount.fuse runs (snapshotter/service/mount_helper.py), and the mount type
#: that makes containerd and mount(8) run it.
MOUNT_PROGRAM = "erofs-passthrough-mount"
MOUNT_TYPE = "fuse." + MOUNT_PROGRAM
#: Our mount options' prefix (the mount program ignores the others it does not know). No
#: `X-`/`x-` prefix: mount(8) does not pass those on to mount helpers (measured).
OPTION_PREFIX = "erofs-passthrough."
DESCRIPTION_OPTION = OPTION_PREFIX + "description="
#: A chain directory's fsmeta and its description, side by side.
FSMETA = "image.fsmeta"
DESCRIPTION = "fsmeta.json"
MAX_DESCRIPTION_BYTES = 64 << 20  # ~1 KB a layer: far beyond any real chain, bounded memory
#: EROFS's device table counts its extra devices in 16 bits.
MAX_LAYERS = 0xFFFF
ROLES = ("fsmeta", "layer")


class DeviceListError(InvalidInput):
    """A VM-mode mount or its description is not what the snapshotter hands out."""


@dataclass(frozen=True)
class ChainDevice:
    """One device the guest gets: a file, its role, and its dm-verity tree (appended).

    The fsmeta carries no device number, tag, blocks, uniaddr or diffID (None)."""

    role: str  # "fsmeta" | "layer"
    path: str
    root_hash: str  # = verity.root_hash
    verity: VerityInfo
    size: int | None = None  # bytes of the EROFS image, without its tree
    digest: str | None = None  # sha256 of those bytes
    device: int | None = None  # the layer's index in the fsmeta's device table (1...)
    tag: str | None = None  # the device table's tag of the layer
    blocks: int | None = None  # the layer's blocks in the device table
    uniaddr: int | None = None  # its first block in the flat address space
    diff_id: str | None = None  # the OCI diffID the layer was converted from

    _OPTIONAL = ("size", "digest", "device", "tag", "blocks", "uniaddr", "diff_id")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "role": self.role,
            "path": self.path,
            "root_hash": self.root_hash,
            "verity": self.verity.to_json(),
        }
        for key in self._OPTIONAL:
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out

    @classmethod
    def from_json(cls, data: Any, what: str = "device") -> ChainDevice:
        if not isinstance(data, dict):
            raise DeviceListError(f"{what} is not a JSON object")
        role = _field(data, "role", str, what, required=False) or "layer"
        if role not in ROLES:
            raise DeviceListError(f"{what}: role {role!r} is none of {', '.join(ROLES)}")
        path = _field(data, "path", str, what)
        if not path:
            raise DeviceListError(f"{what}: empty path")
        root_hash = _field(data, "root_hash", str, what)
        if not isinstance(data.get("verity"), dict):
            raise DeviceListError(f"{what}: no verity description")
        try:
            verity = VerityInfo.from_json(data["verity"])
        except EpError as exc:
            raise DeviceListError(f"{what}: {exc}") from None
        if verity.root_hash != root_hash:
            raise DeviceListError(
                f"{what}: root_hash {root_hash} is not its tree's root {verity.root_hash}"
            )
        counts = {
            k: _field(data, k, int, what, required=False)
            for k in ("size", "device", "blocks", "uniaddr")
        }
        for key, value in counts.items():
            if value is not None and value < 0:
                raise DeviceListError(f"{what}: {key} {value} is negative")
        texts = {
            k: _field(data, k, str, what, required=False) for k in ("digest", "tag", "diff_id")
        }
        return cls(role=role, path=path, root_hash=root_hash, verity=verity, **counts, **texts)


@dataclass(frozen=True)
class ChainDescription:
    """A chain's fsmeta.json: the fsmeta, its layers in device order, and where the signed
    manifest lies when the node signs (`{"path", "signature", "key_id"}`)."""

    fsmeta: ChainDevice
    layers: tuple[ChainDevice, ...]
    manifest: dict[str, str] | None = None

    def devices(self) -> list[ChainDevice]:
        """Every device the guest gets, the fsmeta first, then device 1, 2, ..."""
        return [self.fsmeta, *self.layers]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "fsmeta": self.fsmeta.to_json(),
            "layers": [d.to_json() for d in self.layers],
        }
        if self.manifest is not None:
            out["manifest"] = dict(self.manifest)
        return out

    def to_bytes(self) -> bytes:
        """The file's bytes, as the service has always written them."""
        return json.dumps(self.to_json(), indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: Any) -> ChainDescription:
        if not isinstance(data, dict) or not isinstance(data.get("layers"), list):
            raise DeviceListError("not a chain description (an object with fsmeta and layers)")
        if len(data["layers"]) > MAX_LAYERS:
            raise DeviceListError(
                f"{len(data['layers'])} layers: EROFS addresses at most {MAX_LAYERS} devices"
            )
        fsmeta = ChainDevice.from_json(data.get("fsmeta"), "fsmeta")
        if fsmeta.role != "fsmeta":
            raise DeviceListError(f"fsmeta: role {fsmeta.role!r}, not 'fsmeta'")
        layers = []
        for i, entry in enumerate(data["layers"], start=1):
            layer = ChainDevice.from_json(entry, f"layer {i}")
            if layer.role != "layer" or layer.device not in (None, i):
                raise DeviceListError(
                    f"layer {i}: role {layer.role!r}, device {layer.device}: not layer device {i}"
                )
            layers.append(layer)
        manifest = data.get("manifest")
        if manifest is not None and not (
            isinstance(manifest, dict) and all(isinstance(v, str) for v in manifest.values())
        ):
            raise DeviceListError("manifest: not an object of strings")
        return cls(fsmeta, tuple(layers), manifest)

    @classmethod
    def from_bytes(cls, raw: bytes) -> ChainDescription:
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, ValueError) as exc:
            raise DeviceListError(f"not JSON ({exc})") from None
        return cls.from_json(data)


@dataclass(frozen=True)
class LayerImage:
    """What a chain's description says of one converted layer besides its place in the
    merge: the image's size and digest, the diffID it came from, and its tree."""

    size: int
    digest: str
    diff_id: str
    verity: VerityInfo


def describe_merge(
    result: MergeResult, fsmeta: Path, layers: Sequence[LayerImage]
) -> ChainDescription:
    """The description of a merge's result whose fsmeta is (or will be published) at FSMETA:
    what the service writes beside it and what `publish` signs, from the same facts."""
    if result.verity is None:
        raise InvalidArgument("a VM-mode fsmeta needs its dm-verity tree")
    head = ChainDevice(
        role="fsmeta",
        path=str(fsmeta),
        root_hash=result.verity.root_hash,
        verity=result.verity,
        size=result.size,
        digest=result.digest,
    )
    devices = tuple(
        ChainDevice(
            role="layer",
            path=str(dev.path),
            root_hash=layer.verity.root_hash,
            verity=layer.verity,
            size=layer.size,
            digest=layer.digest,
            device=i,
            tag=dev.tag,
            blocks=dev.blocks,
            uniaddr=dev.uniaddr,
            diff_id=layer.diff_id,
        )
        for i, (dev, layer) in enumerate(zip(result.devices, layers, strict=True), start=1)
    )
    return ChainDescription(head, devices)


# -- the mount option ------------------------------------------------------------------------


def encode_description_option(description: Path) -> str:
    """The mount option that names a chain's description."""
    return DESCRIPTION_OPTION + str(description)


def decode_description_option(options: Sequence[str]) -> str:
    """The description path a VM-mode mount's options carry (exactly one)."""
    found = [o[len(DESCRIPTION_OPTION) :] for o in options if o.startswith(DESCRIPTION_OPTION)]
    if len(found) != 1:
        raise DeviceListError(
            f"the mount carries {len(found)} "
            f"{DESCRIPTION_OPTION.rstrip('=')} options, not one (is the "
            "snapshot in VM mode?)"
        )
    return found[0]


def read_mounted_description(source: str, options: Sequence[str]) -> ChainDescription:
    """The description a VM-mode mount (SOURCE, OPTIONS) names, read and checked."""
    return read_description(source, decode_description_option(options))


def read_description(fsmeta: str | Path, description: str | Path) -> ChainDescription:
    """The description of the chain whose fsmeta is FSMETA, read from DESCRIPTION.

    Only `fsmeta.json` in the fsmeta's own chain directory is read (no symlinks, no other
    place: a mount is not a way to make us read or attach arbitrary files), of bounded size,
    and it must describe that very fsmeta."""
    fsmeta, description = Path(fsmeta), Path(description)
    if not fsmeta.is_absolute() or fsmeta.name != FSMETA:
        raise DeviceListError(f"{fsmeta}: not an absolute path to a chain's {FSMETA}")
    if description != fsmeta.parent / DESCRIPTION:
        raise DeviceListError(
            f"description {description} is not {DESCRIPTION} in the chain directory of {fsmeta}"
        )
    if os.path.realpath(description) != os.path.join(os.path.realpath(fsmeta.parent), DESCRIPTION):
        raise DeviceListError(f"description {description} leads outside {fsmeta.parent}")
    try:
        fd = os.open(description, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise DeviceListError(f"description {description}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_DESCRIPTION_BYTES:
            raise DeviceListError(
                f"description {description}: not a regular file of at "
                f"most {MAX_DESCRIPTION_BYTES} bytes"
            )
        raw = f.read(MAX_DESCRIPTION_BYTES + 1)
    try:
        chain = ChainDescription.from_bytes(raw)
    except DeviceListError as exc:
        raise DeviceListError(f"description {description}: {exc}") from None
    if chain.fsmeta.path != str(fsmeta):
        raise DeviceListError(
            f"description {description} describes {chain.fsmeta.path}, not {fsmeta}"
        )
    return chain


# -- a device list to compare ----------------------------------------------------------------


def device_list_roots(data: Any) -> tuple[list[str], list[str]]:
    """(root hashes in device order, diffIDs of the layers where known) of a device list to
    compare with a signed manifest: a chain description, or a JSON list of devices (the
    fsmeta first). Each device needs only its root (`root_hash`, or its verity's): a list
    written by hand or by another tool is accepted as well as a node's fsmeta.json."""
    roots, diff_ids = [], []
    for i, device in enumerate(_device_entries(data)):
        root = device.get("root_hash") if isinstance(device, dict) else None
        if root is None and isinstance(device, dict) and isinstance(device.get("verity"), dict):
            root = device["verity"].get("root_hash")
        if not isinstance(root, str):
            raise DeviceListError(f"device {i} has no root_hash")
        roots.append(root)
        if i and isinstance(device, dict):
            diff_ids.append(str(device.get("diff_id", "")))
    return roots, diff_ids


def _device_entries(data: Any) -> Iterator[Any]:
    if isinstance(data, dict) and "fsmeta" in data and isinstance(data.get("layers"), list):
        yield data["fsmeta"]
        yield from data["layers"]
    elif isinstance(data, list):
        yield from data
    else:
        raise DeviceListError("neither a chain's fsmeta.json nor a list of devices")


def _field(data: dict[str, Any], key: str, kind: type, what: str, required: bool = True) -> Any:
    if key not in data:
        if required:
            raise DeviceListError(f"{what}: no {key}")
        return None
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise DeviceListError(f"{what}: {key} {value!r} is not a JSON {kind.__name__}")
    return value
