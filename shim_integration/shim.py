"""The runtime (shim) side of a VM-mode rootfs: mounts -> attach plan -> hotplug -> the guest
agent's `open_image` -> an opened image; and back, in reverse, when the container goes.

    plan = plan_from_mounts(mounts)           # the snapshotter's VM-mode Mounts
    plan = plan_from_fetched(mounts, fetched) # ... with `manifest fetch`'s signed manifest
    shim = Shim(attacher, agent)              # passthrough.attach.Attacher, agent_client
    image = shim.open(plan, "ctr1")           # attach, the guest verifies and mounts
    image.rootfs, image.manifest_digest       # where the container runs; for attestation
    shim.close(image)                         # the guest unmounts; devices detached

The plan holds every device in device order (the fsmeta, then device 1, 2, ... of its device
table), the transport and device id (= virtio-blk serial) of each, and the signed manifest
(manifest.json + manifest.sig beside the fsmeta when the node signs, or given by the caller:
a node without a key uses the publisher's, as `erofs-passthrough manifest fetch` writes it,
through `plan_from_fetched`). The host decides
nothing the guest relies on: the agent checks the manifest's signature against the keys it
booted with and every offered disk's root hash before it opens anything (docs/kata.md).
The same plan gives Kata's volume options for runtimes that hand the devices to a Kata agent.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from passthrough.agent_client import AgentClient
from passthrough.attach import VHOST_USER_BLK_SERIAL, Attacher, Attachment, device_id_for
from passthrough.errors import NotAttached, Refused
from passthrough.transports import TRANSPORTS
from shim_integration.kata_volume import KataVirtualVolume, volumes_from_devices
from snapshotter.errors import EpError
from snapshotter.fsmeta.devices import (
    MOUNT_TYPE,
    ChainDevice,
    DeviceListError,
    read_mounted_description,
)
from snapshotter.manifest import ManifestError, SignedManifest, check_devices

MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"


class ShimError(EpError):
    """The mounts cannot be planned, or attaching / opening failed; the message says why."""


class ImageRefused(ShimError):
    """The guest agent refused the image (signature, key, root hashes, device count): `reason`
    is the agent's, and nothing was opened or mounted in the guest."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"the guest refused the image: {reason}")
        self.reason = reason


class MountLike(Protocol):
    """containerd.types.Mount, as our snapshotter.service.mounts.Mount or the protobuf message."""

    type: str
    source: str
    options: Sequence[str]


@dataclass(frozen=True)
class PlannedDevice:
    position: int  # 0 = the fsmeta, i = device i of its device table
    transport: str
    device: ChainDevice = field(repr=False)  # the snapshotter's description of it

    @property
    def role(self) -> str:  # "fsmeta" | "layer"
        return self.device.role

    @property
    def path(self) -> str:
        return self.device.path

    @property
    def root_hash(self) -> str:
        return self.device.root_hash

    @property
    def description(self) -> dict[str, Any]:
        """The device's entry in the chain's fsmeta.json (`ChainDevice.to_json`)."""
        return self.device.to_json()

    @property
    def device_id(self) -> str:
        """passthrough's id for this file over this transport (QEMU device id)."""
        return device_id_for(self.path, self.transport)

    @property
    def serial(self) -> str:
        """What the guest sees as the disk's serial (vhost-user-blk's is fixed: the guest
        finds those by PCI address instead)."""
        return self.device_id if self.transport == "virtio-blk" else VHOST_USER_BLK_SERIAL


@dataclass(frozen=True)
class AttachPlan:
    devices: tuple[PlannedDevice, ...]
    manifest: bytes = field(repr=False)
    signature: bytes = field(repr=False)

    def descriptions(self) -> list[dict[str, Any]]:
        return [d.description for d in self.devices]

    def kata_volumes(self, *, kata_types_only: bool = False) -> list[KataVirtualVolume]:
        """Kata's volumes for the same devices, in device order. The trees must be unsalted
        (a snapshotter configured for Kata) unless KATA_TYPES_ONLY: the options are then
        read right only by kata-types (runtime-rs and today's agent). See docs/kata.md."""
        return volumes_from_devices(self.descriptions(), kata_types_only=kata_types_only)

    def kata_options(self, *, kata_types_only: bool = False) -> list[str]:
        """`io.katacontainers.volume=<base64 JSON>` per device, in device order."""
        return [v.to_option() for v in self.kata_volumes(kata_types_only=kata_types_only)]

    def with_paths(self, paths: Sequence[str]) -> AttachPlan:
        """The same plan with other files at the positions (a copy of a blob, or what a
        misbehaving host might offer: the guest's checks are what stands in the way)."""
        if len(paths) != len(self.devices):
            raise ShimError(f"{len(paths)} paths for {len(self.devices)} devices")
        devices = tuple(
            replace(d, device=replace(d.device, path=str(p)))
            for d, p in zip(self.devices, paths, strict=True)
        )
        return replace(self, devices=devices)

    def request(
        self, name: str, attachments: Sequence[Attachment], timeout: float = 10.0
    ) -> dict[str, Any]:
        """The agent's `open_image` arguments: manifest, signature, and where each device is
        (by serial, or by PCI address for vhost-user-blk), in device order."""
        where = [
            {"serial": a.serial} if a.transport == "virtio-blk" else {"pci": a.pci_slot}
            for a in attachments
        ]
        return {
            "name": name,
            "manifest": base64.b64encode(self.manifest).decode(),
            "signature": base64.b64encode(self.signature).decode(),
            "devices": where,
            "timeout": timeout,
        }


def devices_of(mounts: Sequence[MountLike]) -> tuple[str, list[ChainDevice]]:
    """(fsmeta path, device list) from a VM-mode rootfs's mounts: the device list is read
    from the description the mount names, which must be the fsmeta.json in the fsmeta's own
    chain directory (anything else is refused)."""
    if len(mounts) != 1 or mounts[0].type != MOUNT_TYPE:
        raise ShimError(
            f"not a VM-mode rootfs: expected one {MOUNT_TYPE} mount of an fsmeta, "
            f"got {[m.type for m in mounts]}"
        )
    try:
        chain = read_mounted_description(mounts[0].source, mounts[0].options)
    except DeviceListError as exc:
        raise ShimError(str(exc)) from None
    return mounts[0].source, chain.devices()


def plan_from_mounts(
    mounts: Sequence[MountLike],
    transport: str | Sequence[str] = "virtio-blk",
    manifest: bytes | None = None,
    signature: bytes | None = None,
) -> AttachPlan:
    """The attach plan of a VM-mode rootfs. TRANSPORT: one for all devices, or one per device
    (device order). MANIFEST/SIGNATURE default to manifest.json/manifest.sig beside the fsmeta
    (what `serve` writes when it has a signing_key)."""
    fsmeta, devices = devices_of(mounts)
    transports = [transport] * len(devices) if isinstance(transport, str) else list(transport)
    if len(transports) != len(devices) or not set(transports) <= set(TRANSPORTS):
        raise ShimError(
            f"transports {transports}: need one of {TRANSPORTS} per device ({len(devices)})"
        )
    if manifest is None or signature is None:
        base = Path(fsmeta).parent
        try:
            manifest = (base / MANIFEST_NAME).read_bytes() if manifest is None else manifest
            signature = (base / SIGNATURE_NAME).read_bytes() if signature is None else signature
        except FileNotFoundError as exc:
            raise ShimError(
                f"no signed manifest beside the fsmeta ({exc.filename}): give "
                "`serve` a signing_key, or pass the manifest"
            ) from None
    planned = tuple(
        PlannedDevice(position=i, transport=t, device=d)
        for i, (d, t) in enumerate(zip(devices, transports, strict=True))
    )
    return AttachPlan(planned, manifest, signature)


def read_fetched(directory: Path) -> tuple[bytes, bytes]:
    """(manifest.json, manifest.sig) of a directory `erofs-passthrough manifest fetch` wrote."""
    try:
        return ((directory / MANIFEST_NAME).read_bytes(), (directory / SIGNATURE_NAME).read_bytes())
    except FileNotFoundError as exc:
        raise ShimError(
            f"{exc.filename}: no fetched manifest (erofs-passthrough manifest "
            "fetch IMAGE --out DIR writes manifest.json and manifest.sig)"
        ) from None
    except OSError as exc:
        raise ShimError(f"{exc.filename}: {exc.strerror}") from None


def plan_from_fetched(
    mounts: Sequence[MountLike], directory: Path, transport: str | Sequence[str] = "virtio-blk"
) -> AttachPlan:
    """The attach plan of a VM-mode rootfs on a node without a key, with the publisher's
    signed manifest fetched into DIRECTORY. Refused here, before anything is attached, when
    the manifest's roots are not the snapshot's devices (another image, or a node whose
    conversion differs): the guest would refuse it too, but the node can say why.

    The signature is not checked here: the host holds no trust (any key it checked against
    could be its own); the guest checks it against the keys it booted with."""
    manifest, signature = read_fetched(directory)
    plan = plan_from_mounts(mounts, transport, manifest=manifest, signature=signature)
    try:
        parsed = json.loads(manifest)
        if not isinstance(parsed, dict):
            raise ManifestError("not a JSON object")
        check_devices(SignedManifest(parsed, manifest, {}), [d.root_hash for d in plan.devices])
    except ManifestError as exc:
        raise ShimError(
            f"{directory / MANIFEST_NAME} does not describe this rootfs: {exc}"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise ShimError(f"{directory / MANIFEST_NAME}: not a root manifest") from None
    return plan


@dataclass
class OpenedImage:
    """An image the guest verified and mounted: `result` is the agent's report (manifest
    digest, key id, devices with their disks, dm devices and roots, rootfs, timings)."""

    name: str
    plan: AttachPlan
    attachments: list[Attachment]
    result: dict[str, Any]
    timings: dict[str, float]

    @property
    def rootfs(self) -> str:
        return self.result["rootfs"]

    @property
    def manifest_digest(self) -> str:
        return self.result["manifest_digest"]


class Shim:
    """Opens and closes images on one VM: its Attacher (QMP) and its guest agent. Devices that
    several open images share are attached once and detached with the last of them."""

    def __init__(self, attacher: Attacher, agent: AgentClient, device_timeout: float = 10.0):
        self.attacher = attacher
        self.agent = agent
        self.device_timeout = device_timeout
        self._users: dict[str, int] = {}  # device id -> open images (of ours) using it
        self._foreign: set[str] = set()  # attached by someone else: never detached here

    def open(self, plan: AttachPlan, name: str) -> OpenedImage:
        """Attach every device (device order), ask the agent to verify and mount. On any
        failure what this call attached is detached again, newest first; a refusal raises
        ImageRefused with the guest's reason."""
        timings: dict[str, float] = {}
        attachments: list[Attachment] = []
        try:
            t = time.monotonic()
            before = {a.device_id for a in self.attacher.attached()}
            for dev in plan.devices:
                att = self.attacher.attach(dev.path, dev.transport)
                attachments.append(att)
                if att.device_id in before and att.device_id not in self._users:
                    self._foreign.add(att.device_id)
                self._users[att.device_id] = self._users.get(att.device_id, 0) + 1
            timings["attach"] = time.monotonic() - t
            t = time.monotonic()
            result = self.agent.call(
                "open_image", **plan.request(name, attachments, self.device_timeout)
            )
            timings["agent_open"] = time.monotonic() - t
        except BaseException as exc:
            try:
                self._release(attachments)
            except ShimError as undo:
                exc.add_note(f"and undoing the attach: {undo}")
            if isinstance(exc, Refused):
                raise ImageRefused(exc.reason) from None
            raise
        return OpenedImage(name, plan, attachments, result, timings)

    def close(self, image: OpenedImage) -> dict[str, float]:
        """The guest unmounts and closes the image; then its devices are detached, newest
        first (those another open image still uses stay)."""
        t = time.monotonic()
        self.agent.call("close_image", name=image.name)
        closed = time.monotonic() - t
        t = time.monotonic()
        self._release(image.attachments)
        return {"agent_close": closed, "detach": time.monotonic() - t}

    def _release(self, attachments: list[Attachment]) -> None:
        errors = []
        for att in reversed(attachments):
            left = self._users.get(att.device_id, 1) - 1
            if left > 0:
                self._users[att.device_id] = left
                continue
            self._users.pop(att.device_id, None)
            if att.device_id in self._foreign:
                continue
            try:
                self.attacher.detach(att.device_id)
            except NotAttached:
                pass
            except EpError as exc:
                errors.append(f"{att.device_id}: {exc}")
        if errors:
            raise ShimError("detach failed: " + "; ".join(errors))
