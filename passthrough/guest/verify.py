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
under Debian's python3. The few superblock fields it reads are the v1 layout of
`snapshotter.verity.superblock`; the host tests check both agree.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import struct
from typing import Any

from snapshotter.manifest import ManifestError, SignedManifest, check_devices, load_public_key

CMDLINE_KEYS = "ep.trusted_keys"
_SB_SIGNATURE = b"verity\0\0"
_SB_HEADER = struct.Struct("<8sII16s32sIIQH6x")  # up to the salt, 88 bytes
_SB_SIZE = 512


def trusted_keys_from_cmdline(cmdline: str) -> list[Any]:
    """Every `ep.trusted_keys=` value on CMDLINE: comma-separated base64 of PEM public keys."""
    keys = []
    for arg in cmdline.split():
        if not arg.startswith(CMDLINE_KEYS + "="):
            continue
        for part in arg[len(CMDLINE_KEYS) + 1:].split(","):
            if not part:
                continue
            try:
                pem = base64.b64decode(part, validate=True)
            except (binascii.Error, ValueError):
                raise ManifestError(f"{CMDLINE_KEYS}: {part[:16]}... is not base64") from None
            keys.append(load_public_key(pem))
    return keys


def encode_trusted_keys(pems: list[bytes]) -> str:
    """The kernel command line argument for PEMS (the launcher builds the same)."""
    return f"{CMDLINE_KEYS}=" + ",".join(base64.b64encode(p).decode() for p in pems)


def _pread(fd: int, size: int, offset: int) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise ManifestError(f"short read: {len(data)} of {size} bytes at byte {offset}")
    return data


def tree_start(verity: dict[str, Any]) -> int:
    """The table line's hash_start_block for a signed verity entry (tree appended, hash
    device = data device)."""
    hbs = int(verity.get("hash_block_size", 4096))
    offset = int(verity["hash_offset"])
    if verity.get("superblock", True):
        return -(-(offset + _SB_SIZE) // hbs)
    return offset // hbs


def device_root(path: str, verity: dict[str, Any]) -> str:
    """The dm-verity root hash the device at PATH carries where VERITY (a signed manifest
    entry) says its tree is. ManifestError if there is no such tree there."""
    if verity.get("hash_name", "sha256") != "sha256":
        raise ManifestError(f"unsupported hash {verity.get('hash_name')!r}")
    dbs = int(verity.get("data_block_size", 4096))
    hbs = int(verity.get("hash_block_size", 4096))
    salt = bytes.fromhex(verity.get("salt") or "")
    offset = int(verity["hash_offset"])
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ManifestError(f"cannot open {path}: {exc.strerror}") from None
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        if int(verity["data_blocks"]) > 1:
            need = tree_start(verity) * hbs + hbs  # up to the end of the tree's top block
        else:  # one data block has no tree (its hash is the root): data and superblock
            need = max(dbs, offset + (_SB_SIZE if verity.get("superblock", True) else 0))
        if size < need:
            raise ManifestError(f"the disk has {size} bytes, the signed image at least {need}")
        if verity.get("superblock", True):
            head = _pread(fd, _SB_HEADER.size, offset)
            sig, version, hash_type, _uuid, alg, sb_dbs, sb_hbs, blocks, salt_size = \
                _SB_HEADER.unpack(head)
            if sig != _SB_SIGNATURE:
                raise ManifestError(f"no dm-verity superblock at byte {offset}")
            sb_salt = _pread(fd, salt_size, offset + _SB_HEADER.size) if salt_size else b""
            found = (version, hash_type, alg.rstrip(b"\0"), sb_dbs, sb_hbs, blocks, sb_salt)
            want = (1, 1, b"sha256", dbs, hbs, int(verity["data_blocks"]), salt)
            if found != want:
                raise ManifestError("its dm-verity superblock is not the signed geometry "
                                    f"({blocks} data blocks, salt {sb_salt.hex()[:16]}...)")
        if int(verity["data_blocks"]) == 1:  # no tree: the root is the one data block's hash
            top = _pread(fd, dbs, 0)
        else:
            top = _pread(fd, hbs, tree_start(verity) * hbs)
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
            raise ManifestError(f"{_position(signed, i)}: malformed signed verity entry "
                                f"({exc!r})") from None
        except ManifestError as exc:
            raise ManifestError(f"{_position(signed, i)} ({label}): {exc}: not the signed "
                                "device") from None
    try:
        check_devices(signed, roots)
    except ManifestError as exc:
        bad = next(i for i, (a, b) in enumerate(zip(roots, signed.expected_roots(),
                                                    strict=True)) if a != b)
        raise ManifestError(f"{exc} ({labels[bad]})") from None
    return roots


def _position(signed: SignedManifest, i: int) -> str:
    return "fsmeta" if i == 0 and "fsmeta" in signed.manifest else f"device {i}"


def verity_params(device: str, verity: dict[str, Any]) -> dict[str, Any]:
    """The agent's `verity_open` fields for DEVICE from a signed verity entry (tree appended
    to the data, so the hash device is the data device)."""
    return {
        "data_device": device, "hash_device": device,
        "data_blocks": int(verity["data_blocks"]), "hash_start_block": tree_start(verity),
        "data_block_size": int(verity.get("data_block_size", 4096)),
        "hash_block_size": int(verity.get("hash_block_size", 4096)),
        "hash_type": 1, "algorithm": verity.get("hash_name", "sha256"),
        "root_hash": verity["root_hash"], "salt": verity.get("salt") or "-",
    }
