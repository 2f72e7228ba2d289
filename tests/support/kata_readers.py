"""The Kata readers of our volume options and sidecars, re-implemented from their rules.

Kata has four readers of `DmVerityInfo` (the `dm_verity` of an `io.katacontainers.volume`),
with different field rules. The decoders below follow *their* rules, written from their
source (kata-containers main 7c6ba40c, Aug 2026, = release 4.1 in these files;
confidential-containers/guest-components 8246e5e0); no code of theirs is copied:

- runtime-go, `src/runtime/virtcontainers/types/virtual_volume.go`: `DmVerityInfo` has only
  hashtype, hash, blocknum, blocksize, hashsize, offset (Go's encoding/json drops every other
  key, so no salt and no no_superblock); `IsValid` accepts hashtype sha256 (64 hex) or sha1
  (40 hex), blocknum in 1..2^32-1, both block sizes in 2^9..2^19, `offset % hashsize == 0`
  and `offset >= blocksize * blocknum`; anything else refuses the container. It builds no
  table: what it keeps is what an agent of its time got, read by the rule below.
- Kata's earlier agent code, `src/libs/kata-types/src/dmverity.rs` at 47c9f9cf42 (Dec 2023,
  used by `src/agent/src/storage/dm_verity_handler.rs`): the same six fields; validation as
  runtime-go's but sha1/sha224/sha256/sha384/sha512 and block sizes 2^9..2^31 powers of two;
  table `1 <dev> <dev> <blocksize> <hashsize> <blocknum> ceil(offset/hashsize) <hashtype>
  <hash> -` (no salt, ever).
- image-rs, guest-components `image-rs/src/verity/dmverity.rs` (`DmVerityOption`): the same
  six fields, sha256/sha1 only, block sizes powers of two in 2^9..2^19, the same offset rule;
  table with `ceil(offset/hashsize)` and salt `-`.
- kata-types today, `src/libs/kata-types/src/mount.rs` (`DmVerityInfo`: `salt: Option`,
  `hash_type` default 1, `no_superblock` default false) and `src/libs/kata-types/src/
  dmverity.rs` (`create_dmverity_device`): tree start `offset/hashsize` with no_superblock,
  else `offset/hashsize + ceil(512/hashsize)`; salt or `-`; version `hash_type`. It
  validates nothing itself.

Each derives a dm-verity table; the tests (tests/kernel/test_kata_readers.py, tests/vm/
test_kata_guest.py) check that all are the same and that the table verifies the blob.
"""

from __future__ import annotations

import base64
import hashlib
import json
import tarfile
from pathlib import Path

from shim_integration.kata_volume import KATA_VOLUME_OPTION, volumes_from_devices
from snapshotter.verity import VerityInfo

SECTOR = 512
DEVICE = "/dev/vdX"  # every reader names the same device twice: data and tree are one file
RUNTIME_GO_FIELDS = ("hashtype", "hash", "blocknum", "blocksize", "hashsize", "offset")


class Refused(Exception):
    """A reader's validation refused the options (Kata would refuse the container)."""


def _dm_verity_of(option: str) -> dict:
    assert option.startswith(KATA_VOLUME_OPTION + "=")
    volume = json.loads(base64.b64decode(option.split("=", 1)[1], validate=True))
    return volume["dm_verity"]


def _uint(obj: dict, key: str, default: int | None = None) -> int:
    # Go's uint64 and serde's u64 both refuse negatives, fractions, strings and booleans.
    value = obj.get(key, default)
    if value is None:
        raise Refused(f"missing field {key}")
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise Refused(f"{key}: {value!r} is not an unsigned integer")
    return value


def _six_fields(obj: dict, missing_is_zero: bool) -> dict:
    """The six fields every reader has. A missing key is Go's zero value (runtime-go) or an
    error (serde, the Rust readers); a value of the wrong JSON type is an error in both."""
    out: dict = {}
    for key in ("hashtype", "hash"):
        value = obj.get(key, "" if missing_is_zero else None)
        if not isinstance(value, str):
            raise Refused(f"{key}: {value!r} is not a string")
        out[key] = value
    for key in ("blocknum", "blocksize", "hashsize", "offset"):
        out[key] = _uint(obj, key, 0 if missing_is_zero else None)
    return out


def _check_common(
    f: dict, hash_hex: dict[str, int], sizes: tuple[int, int], powers_of_two: bool
) -> None:
    want = hash_hex.get(f["hashtype"].lower())
    if want is None:
        raise Refused(f"unsupported hash algorithm {f['hashtype']}")
    try:
        bytes.fromhex(f["hash"])
    except ValueError:
        raise Refused("root hash is not hex") from None
    if len(f["hash"]) != want:
        raise Refused("root hash has the wrong length")
    if not 0 < f["blocknum"] <= 0xFFFFFFFF:
        raise Refused("block count out of range")
    for size in (f["blocksize"], f["hashsize"]):
        if not sizes[0] <= size <= sizes[1] or (powers_of_two and size & (size - 1)):
            raise Refused(f"unsupported block size {size}")
    if f["offset"] % f["hashsize"] or f["offset"] < f["blocksize"] * f["blocknum"]:
        raise Refused(f"invalid hash offset {f['offset']}")


def _table(f: dict, hash_start: int, salt: str, version: int = 1) -> str:
    return (
        f"0 {f['blocknum'] * f['blocksize'] // SECTOR} verity {version} {DEVICE} {DEVICE} "
        f"{f['blocksize']} {f['hashsize']} {f['blocknum']} {hash_start} {f['hashtype']} "
        f"{f['hash']} {salt}"
    )


def runtime_go(obj: dict) -> str:
    """runtime-go keeps its six fields and validates them; the table is what the agent of its
    time builds from exactly those (the `ceil` rule, no salt)."""
    kept = _six_fields({k: obj[k] for k in RUNTIME_GO_FIELDS if k in obj}, True)
    _check_common(kept, {"sha256": 64, "sha1": 40}, (1 << 9, 1 << 19), False)
    return kata_agent_2023(kept)


def kata_agent_2023(obj: dict) -> str:
    f = _six_fields(obj, False)
    _check_common(
        f,
        {"sha1": 40, "sha224": 56, "sha256": 64, "sha384": 96, "sha512": 128},
        (1 << 9, 1 << 31),
        True,
    )
    return _table(f, -(-f["offset"] // f["hashsize"]), "-")


def image_rs(obj: dict) -> str:
    # `DmVerityOption::try_from` takes the option text: one containing "sha256:" is read as
    # nydus' tarfs triple "<blocknum>,<offset>,sha256:<hash>" (blocksize 512), not as JSON.
    text = json.dumps(obj, separators=(",", ":"))
    if "sha256:" in text:
        raise Refused("read as a tarfs triple, not as JSON")
    f = _six_fields(obj, False)
    _check_common(f, {"sha256": 64, "sha1": 40}, (1 << 9, 1 << 19), True)
    return _table(f, -(-f["offset"] // f["hashsize"]), "-")


def kata_types(obj: dict) -> str:
    f = _six_fields(obj, False)
    if f["hashsize"] == 0:
        raise Refused("hashsize 0 (a division by zero in the agent)")
    no_superblock = obj.get("no_superblock", False)
    if not isinstance(no_superblock, bool):
        raise Refused("no_superblock is not a boolean")
    salt = obj.get("salt")
    if salt is not None and not isinstance(salt, str):
        raise Refused("salt is not a string")
    if no_superblock:
        start = f["offset"] // f["hashsize"]
    else:
        start = f["offset"] // f["hashsize"] + -(-SECTOR // f["hashsize"])
    return _table(f, start, salt or "-", _uint(obj, "hash_type", 1))


READERS = {
    "runtime-go": runtime_go,
    "kata-agent-2023": kata_agent_2023,
    "image-rs": image_rs,
    "kata-types": kata_types,
}


def tables_of(option: str) -> dict[str, str]:
    obj = _dm_verity_of(option)
    return {name: read(obj) for name, read in READERS.items()}


def runtime_rs_sidecar(blob: Path, sidecar: dict) -> str:
    """runtime-rs' erofs path (a `layer.erofs.dmverity` sidecar, not a volume option):
    `kata-types/src/gpt_disk.rs` `generate_dmverity_options` looks for a v1 superblock magic at
    `hashoffset` and takes the salt from the sidecar's optional `salt`, else from that
    superblock when its salt_size is not 0, else containerd's default (32 zero bytes); the
    agent (`src/agent/src/storage/multi_layer_erofs.rs` `parse_dmverity_options`) maps an
    empty or `-` salt to none, defaults sha256 and 4096/4096, sets blocknum = hashoffset /
    4096, and kata-types' table rule (above) starts the tree one block past the superblock."""
    zero_salt = "00" * 32
    offset = _uint(sidecar, "hashoffset")
    with open(blob, "rb") as f:
        f.seek(offset)
        head = f.read(88 + 256)
    has_superblock = head[:8] == b"verity\0\0"
    if sidecar.get("salt") is not None:
        salt = sidecar["salt"]
    elif has_superblock:
        size = int.from_bytes(head[80:82], "little")
        salt = head[88 : 88 + size].hex() if 0 < size <= 256 else zero_salt
    else:
        salt = zero_salt
    fields = {
        "hashtype": "sha256",
        "hash": sidecar["roothash"],
        "blocknum": offset // 4096,
        "blocksize": 4096,
        "hashsize": 4096,
        "offset": offset,
    }
    return kata_types(
        {
            **fields,
            "no_superblock": not has_superblock,
            **({"salt": salt} if salt not in ("", "-") else {}),
        }
    )


def layer_option(info: VerityInfo, path: Path) -> str:
    """The Kata volume option our shim gives for one layer device."""
    devices = [{"role": "layer", "path": str(path), "verity": info.to_json()}]
    return volumes_from_devices(devices)[0].to_option()


def _fill(root: Path) -> dict[str, bytes]:
    files = {
        "etc/os-release": b"NAME=kata-readers\n",
        "bin/tool": bytes(range(256)) * 300,
        "usr/share/big": b"\x5a" * (3 << 20),
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


def sample_layer_tar(tmp_path: Path) -> tuple[Path, str, dict[str, bytes]]:
    """A small PAX layer (its sources under TMP_PATH/src): the tar, its diff ID, its files."""
    src = tmp_path / "src"
    files = _fill(src)
    tar = tmp_path / "layer.tar"
    with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT) as tf:
        for name in sorted(files):
            tf.add(src / name, arcname=name)
    return tar, "sha256:" + hashlib.sha256(tar.read_bytes()).hexdigest(), files
