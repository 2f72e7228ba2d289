"""What the guest checks before it opens an image's devices: the keys it booted with, the signed
manifest, and the root hash each offered device actually carries.

The host is not trusted. It offers the guest a manifest, its signature and a list of disks in
device order (the fsmeta, then device 1, 2, ... of the fsmeta's device table). The guest:

1. takes its trusted public keys from the kernel command line
   (`ep.trusted_keys=<base64 PEM>[,<base64 PEM>...]`, repeatable);
2. verifies the signature with one of them (`manifest.verify`);
3. reads, from each offered disk, the dm-verity tree's top-level hash block where the signed
   geometry says it is and computes the root hash the disk really carries (sha256 of salt and
   that block, as dm-verity does), then requires exactly the signed roots in device order
   (`manifest.check_devices`): a substituted, reordered, missing or extra disk is refused here,
   before any dm device exists;
4. opens each disk with dm-verity using the *signed* geometry and root, never the host's word.
   From then on the kernel checks every block it reads against that root (a flipped byte is
   EIO), so a disk changed after step 3 gains the host nothing.

Standard library plus `cryptography` (through `manifest`) only: this module runs in the guest
under Debian's python3. The verity rules (superblock layout, tree start, table line) are
`snapshotter.verity`'s, which ships in the guest too.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from typing import Any

from passthrough.agent_protocol import ARG_TRUSTED_KEYS, cmdline_values
from snapshotter.errors import EpError
from snapshotter.manifest import (
    ManifestError,
    SignedManifest,
    check_devices,
    load_public_key,
)
from snapshotter.verity.info import VerityInfo
from snapshotter.verity.superblock import SUPERBLOCK_SIZE, VeritySuperblock

__all__ = [
    "ARG_TRUSTED_KEYS",
    "check_offered",
    "device_root",
    "signed_verity",
    "trusted_keys_from_cmdline",
]


def trusted_keys_from_cmdline(cmdline: str) -> list[Any]:
    """Every `ep.trusted_keys=` value on CMDLINE: comma-separated base64 of PEM public keys."""
    keys = []
    for value in cmdline_values(cmdline, ARG_TRUSTED_KEYS):
        for part in value.split(","):
            if not part:
                continue
            try:
                pem = base64.b64decode(part, validate=True)
            except (binascii.Error, ValueError):
                raise ManifestError(f"{ARG_TRUSTED_KEYS}: {part[:16]}... is not base64") from None
            keys.append(load_public_key(pem))
    return keys


def _pread(fd: int, size: int, offset: int) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise ManifestError(f"short read: {len(data)} of {size} bytes at byte {offset}")
    return data


def signed_verity(entry: dict[str, Any]) -> VerityInfo:
    """A signed manifest's verity entry (`VerityInfo.signed_entry`) as a VerityInfo: the tree
    appended to the data, so one device is data and hash device. ManifestError if malformed."""
    try:
        return VerityInfo.from_signed_entry(entry)
    except (EpError, KeyError, TypeError) as exc:
        raise ManifestError(f"malformed signed verity entry ({exc})") from None


def device_root(path: str, entry: dict[str, Any]) -> str:
    """The dm-verity root hash the device at PATH carries where ENTRY (a signed manifest
    entry) says its tree is. ManifestError if there is no such tree there."""
    if entry.get("hash_name", "sha256") != "sha256":
        raise ManifestError(f"unsupported hash {entry.get('hash_name')!r}")
    info = signed_verity(entry)
    dbs, hbs, offset = info.data_block_size, info.hash_block_size, info.hash_offset
    salt = bytes.fromhex(info.salt)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ManifestError(f"cannot open {path}: {exc.strerror}") from None
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        if info.data_blocks > 1:
            need = info.hash_start_block * hbs + hbs  # up to the end of the tree's top block
        else:  # one data block has no tree (its hash is the root): data and superblock
            need = max(dbs, offset + (SUPERBLOCK_SIZE if info.superblock else 0))
        if size < need:
            raise ManifestError(f"the disk has {size} bytes, the signed image at least {need}")
        if info.superblock:
            try:
                sb = VeritySuperblock.deserialize(_pread(fd, SUPERBLOCK_SIZE, offset))
            except EpError as exc:
                raise ManifestError(f"no dm-verity superblock at byte {offset} ({exc})") from None
            found = (
                sb.hash_type,
                sb.algorithm,
                sb.data_block_size,
                sb.hash_block_size,
                sb.data_blocks,
                sb.salt,
            )
            if found != (1, "sha256", dbs, hbs, info.data_blocks, salt):
                raise ManifestError(
                    "its dm-verity superblock is not the signed geometry "
                    f"({sb.data_blocks} data blocks, salt "
                    f"{sb.salt.hex()[:16]}...)"
                )
        if info.data_blocks == 1:  # no tree: the root is the one data block's hash
            top = _pread(fd, dbs, 0)
        else:
            top = _pread(fd, hbs, info.hash_start_block * hbs)
    except OSError as exc:
        raise ManifestError(f"reading {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    return hashlib.sha256(salt + top).hexdigest()


def check_offered(signed: SignedManifest, paths: list[str], labels: list[str]) -> list[str]:
    """Refuse (ManifestError) unless the disks at PATHS (device order, fsmeta first) carry
    exactly the signed roots; LABELS name each disk in the messages. Returns the roots."""
    verities = signed.device_verity()
    if len(paths) != len(verities):
        raise ManifestError(f"{len(paths)} devices offered, the manifest names {len(verities)}")
    roots = []
    for i, (path, label, verity) in enumerate(zip(paths, labels, verities, strict=True)):
        try:
            roots.append(device_root(path, verity))
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(
                f"{_position(signed, i)}: malformed signed verity entry ({exc!r})"
            ) from None
        except ManifestError as exc:
            raise ManifestError(
                f"{_position(signed, i)} ({label}): {exc}: not the signed device"
            ) from None
    try:
        check_devices(signed, roots)
    except ManifestError as exc:
        bad = next(
            i for i, (a, b) in enumerate(zip(roots, signed.expected_roots(), strict=True)) if a != b
        )
        raise ManifestError(f"{exc} ({labels[bad]})") from None
    return roots


def _position(signed: SignedManifest, i: int) -> str:
    return "fsmeta" if i == 0 and "fsmeta" in signed.manifest else f"device {i}"
