"""Signed images: verify a manifest against the keys the guest booted with and the root
hashes of the offered disks; only then open dm-verity per disk and mount the fsmeta with the
layer devices under a writable overlay (tmpfs upper). Refusals open and mount nothing."""

from __future__ import annotations

import errno
import os
import time

from passthrough.guest import dm, mounts
from passthrough.guest.disks import wait_block
from passthrough.guest.state import (
    IMAGE_BASE,
    AgentError,
    AgentState,
    Image,
    oserror,
    refusal,
    rmdir_quiet,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def image_name(req: dict[str, Any]) -> str:
    name = req.get("name") or "image"
    if not (
        isinstance(name, str) and len(name) <= 32 and all(c.isalnum() or c in "-_" for c in name)
    ):
        raise AgentError(f"bad image name {name!r} (1-32 of [A-Za-z0-9_-])", errno.EINVAL)
    return name


def _b64(req: dict[str, Any], key: str) -> bytes:
    import base64
    import binascii

    try:
        return base64.b64decode(req[key], validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise refusal(f"{key} is not base64") from None


def op_open_image(state: AgentState, req: dict[str, Any]) -> dict[str, Any]:
    started = time.monotonic()
    name = image_name(req)
    if state.image(name) is not None:
        raise AgentError(f"image {name} is already open", errno.EEXIST)
    offered = req.get("devices")
    if not isinstance(offered, list) or not offered:
        raise AgentError("devices: a list of {serial} or {pci}, fsmeta first", errno.EINVAL)
    payload, signature = _b64(req, "manifest"), _b64(req, "signature")
    # Imported here, not at start-up: cryptography (through the manifest) is slow to load.
    from passthrough.guest import verify
    from snapshotter import fsmount, manifest

    timings: dict[str, float] = {}
    try:
        keys = verify.trusted_keys_from_cmdline(state.cmdline())
        if not keys:
            raise manifest.ManifestError(
                f"the guest booted without trusted keys ({verify.ARG_TRUSTED_KEYS}=)"
            )
        signed = manifest.verify(payload, signature, keys)
        if "fsmeta" not in signed.manifest:
            raise manifest.ManifestError("the manifest names no fsmeta to mount")
        expected = len(signed.device_verity())
        if len(offered) != expected:
            raise manifest.ManifestError(
                f"{len(offered)} devices offered, the manifest names {expected}"
            )
    except manifest.ManifestError as exc:
        raise refusal(str(exc)) from None
    timings["verify_signature"] = time.monotonic() - started

    t = time.monotonic()
    timeout = float(req.get("timeout", 10))
    disks = [wait_block(state, d.get("serial"), d.get("pci"), timeout) for d in offered]
    timings["wait_devices"] = time.monotonic() - t
    t = time.monotonic()
    labels = [
        f"{d['name']} "
        + (f"serial {d['serial']}" if o.get("serial") is not None else f"pci {o.get('pci')}")
        for d, o in zip(disks, offered, strict=True)
    ]
    try:
        roots = verify.check_offered(signed, [d["path"] for d in disks], labels)
    except manifest.ManifestError as exc:
        raise refusal(str(exc)) from None
    timings["check_roots"] = time.monotonic() - t

    image = Image(name, signed.digest())
    base = f"{IMAGE_BASE}/{name}"
    try:
        t = time.monotonic()
        mappers = []
        for i, (disk, entry) in enumerate(zip(disks, signed.device_verity(), strict=True)):
            table = verify.signed_verity(entry).table_line(disk["path"], disk["path"])
            mappers.append(dm.create(state, f"{name}-{i}", table))
            image.dm.append(f"{name}-{i}")
        timings["verity_open"] = time.monotonic() - t
        t = time.monotonic()
        lower, rw, rootfs = f"{base}/lower", f"{base}/rw", f"{base}/rootfs"
        os.makedirs(lower, exist_ok=True)
        try:
            fsmount.mount_erofs(mappers[0], lower, mappers[1:])
        except OSError as exc:
            raise oserror(exc, f"mount the fsmeta of {name}") from None
        state.mounts.append(lower)
        image.mounts.append(lower)
        mounts.mount_tmpfs(state, rw, str(req.get("upper_size", "64m")))
        image.mounts.append(rw)
        os.makedirs(f"{rw}/upper", mode=0o755)
        os.makedirs(f"{rw}/work", mode=0o700)
        mounts.op_mount(
            state,
            {
                "source": "overlay",
                "target": rootfs,
                "fstype": "overlay",
                "read_only": False,
                "options": [f"lowerdir={lower}", f"upperdir={rw}/upper", f"workdir={rw}/work"],
            },
        )
        image.mounts.append(rootfs)
        timings["mount"] = time.monotonic() - t
    except BaseException:
        try:  # noqa: SIM105 (contextlib would be one more module to import)
            close(state, image)
        except AgentError:
            pass  # the first error is the one to report; teardown retries the rest
        raise
    image.result = {
        "name": name,
        "manifest_digest": image.digest,
        "key_id": signed.signature["key_id"],
        "image": signed.manifest.get("image"),
        "rootfs": rootfs,
        "lower": lower,
        "upper": f"{rw}/upper",
        "devices": [
            {
                "position": i,
                "role": "fsmeta" if i == 0 else "layer",
                "disk": d["path"],
                "serial": d["serial"],
                "pci_path": d["pci_path"],
                "dm": m,
                "root_hash": r,
            }
            for i, (d, m, r) in enumerate(zip(disks, mappers, roots, strict=True))
        ],
        "timings": {k: round(v, 4) for k, v in timings.items()},
    }
    state.add_image(image)
    return image.result


def close(state: AgentState, image: Image) -> dict[str, list[str]]:
    """Unmount IMAGE's mounts and remove its dm devices, newest first."""
    done: dict[str, list[str]] = {"unmounted": [], "removed": []}
    for target in reversed(image.mounts):
        if target in state.mounts:
            mounts.umount(state, target)
        done["unmounted"].append(target)
    image.mounts.clear()
    for name in reversed(image.dm):
        if name in state.dm:
            dm.remove(state, name)
        done["removed"].append(name)
    image.dm.clear()
    rmdir_quiet(f"{IMAGE_BASE}/{image.name}")
    state.forget_image(image.name)
    return done


def op_close_image(state: AgentState, req: dict[str, Any]) -> dict[str, Any]:
    name = image_name(req)
    image = state.image(name)
    if image is None:
        raise AgentError(f"image {name} is not open", errno.ENOENT)
    return close(state, image)


def op_images(state: AgentState, req: dict[str, Any]) -> dict[str, Any]:
    return {"images": {i.name: i.result for i in state.images()}}
