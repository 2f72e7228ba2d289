"""Our Kata volume options, read the way each Kata component reads them.

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

Each derives a dm-verity table; all must be the same, and that table must verify the blob
with the real veritysetup and open it through a guest kernel's dm-verity (this host's kernel
has no device-mapper; the shared test guest has).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import subprocess
import tarfile
from pathlib import Path

import pytest

from passthrough.agent_client import AgentClient
from passthrough.attach import Attacher
from passthrough.guest_volume import find_disk
from shim_integration.kata_volume import KATA_VOLUME_OPTION, volumes_from_devices
from snapshotter.errors import EpError
from snapshotter.ingest.convert import convert_directory, convert_layer, import_erofs_image
from snapshotter.verity import KATA_VERITY, VerityInfo, VerityParams, format_file
from tests.support.helpers import require_tool

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


def _check_common(f: dict, hash_hex: dict[str, int], sizes: tuple[int, int],
                  powers_of_two: bool) -> None:
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
    return (f"0 {f['blocknum'] * f['blocksize'] // SECTOR} verity {version} {DEVICE} {DEVICE} "
            f"{f['blocksize']} {f['hashsize']} {f['blocknum']} {hash_start} {f['hashtype']} "
            f"{f['hash']} {salt}")


def runtime_go(obj: dict) -> str:
    """runtime-go keeps its six fields and validates them; the table is what the agent of its
    time builds from exactly those (the `ceil` rule, no salt)."""
    kept = _six_fields({k: obj[k] for k in RUNTIME_GO_FIELDS if k in obj}, True)
    _check_common(kept, {"sha256": 64, "sha1": 40}, (1 << 9, 1 << 19), False)
    return kata_agent_2023(kept)


def kata_agent_2023(obj: dict) -> str:
    f = _six_fields(obj, False)
    _check_common(f, {"sha1": 40, "sha224": 56, "sha256": 64, "sha384": 96, "sha512": 128},
                  (1 << 9, 1 << 31), True)
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


READERS = {"runtime-go": runtime_go, "kata-agent-2023": kata_agent_2023, "image-rs": image_rs,
           "kata-types": kata_types}


def tables_of(option: str) -> dict[str, str]:
    obj = _dm_verity_of(option)
    return {name: read(obj) for name, read in READERS.items()}


def veritysetup_verify(blob: Path, table: str) -> subprocess.CompletedProcess:
    """Check BLOB against exactly what the table says, with the real veritysetup (the table
    names no superblock, so neither does the check: every parameter comes from the table)."""
    (_, _, _, version, _, _, dbs, hbs, blocks, start, alg, root, salt) = table.split()
    return subprocess.run(
        ["veritysetup", "verify", str(blob), str(blob), root, "--no-superblock",
         f"--format={version}", f"--hash={alg}", f"--data-block-size={dbs}",
         f"--hash-block-size={hbs}", f"--data-blocks={blocks}",
         f"--hash-offset={int(start) * int(hbs)}", f"--salt={salt}"],
        capture_output=True, text=True)


def _layer_option(info: VerityInfo, path: Path) -> str:
    devices = [{"role": "layer", "path": str(path), "verity": info.to_json()}]
    return volumes_from_devices(devices)[0].to_option()


def _blob(tmp_path: Path, size: int, params: VerityParams) -> tuple[Path, VerityInfo]:
    blob = tmp_path / "layer.erofs"
    blob.write_bytes(bytes((i * 131 + 7) % 251 for i in range(size)))
    return blob, format_file(blob, params=params)


@pytest.mark.parametrize("size", [4096, 10 * 4096 + 1, 300 * 4096])
def test_every_kata_reader_derives_one_table_that_verifies(tmp_path, size):
    require_tool("veritysetup")
    blob, info = _blob(tmp_path, size, VerityParams(salt=b""))
    tables = tables_of(_layer_option(info, blob))
    assert len(set(tables.values())) == 1, tables
    table = tables["kata-types"]
    assert table == info.table_line(DEVICE, DEVICE)
    assert veritysetup_verify(blob, table).returncode == 0
    # The check can fail: one flipped data byte and veritysetup refuses the same table.
    data = bytearray(blob.read_bytes())
    data[size // 2] ^= 1
    blob.write_bytes(data)
    flipped = veritysetup_verify(blob, table)
    assert flipped.returncode != 0
    assert re.search(r"corrupt|verification .* failed", flipped.stderr, re.I), flipped.stderr


def _fill(root: Path) -> dict[str, bytes]:
    files = {"etc/os-release": b"NAME=kata-readers\n", "bin/tool": bytes(range(256)) * 300,
             "usr/share/big": b"\x5a" * (3 << 20)}
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


def _layer_tar(tmp_path: Path) -> tuple[Path, str, dict[str, bytes]]:
    src = tmp_path / "src"
    files = _fill(src)
    tar = tmp_path / "layer.tar"
    with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT) as tf:
        for name in sorted(files):
            tf.add(src / name, arcname=name)
    return tar, "sha256:" + hashlib.sha256(tar.read_bytes()).hexdigest(), files


@pytest.mark.parametrize("how", ["tar", "directory", "native"])
def test_a_layer_converted_for_kata_verifies_by_every_readers_table(tmp_path, how):
    """The conversions the service runs, with the parameters it uses for Kata: no salt, the
    tree appended behind its superblock; Kata's options for it; the one table all readers
    derive, checked by veritysetup (and in a guest kernel by the test below)."""
    require_tool("veritysetup")
    tar, diff_id, _files = _layer_tar(tmp_path)
    blob = tmp_path / "layer.erofs"
    if how == "tar":  # the differ's path: leaves hashed while the image is written
        result = convert_layer(tar, blob, expected_diff_id=diff_id, verity=KATA_VERITY)
    elif how == "directory":  # a snapshot's upper directory: hashed from the finished image
        result = convert_directory(tmp_path / "src", blob, verity=KATA_VERITY)
    else:  # a native EROFS layer, stored as it is
        convert_directory(tmp_path / "src", tmp_path / "native.erofs")
        with open(tmp_path / "native.erofs", "rb") as native:
            result = import_erofs_image(native, blob, verity=KATA_VERITY)
    info = result.verity
    assert info.salt == "" and info.superblock
    assert info.params().unsalted
    tables = tables_of(_layer_option(info, blob))
    assert len(set(tables.values())) == 1, tables
    table = tables["runtime-go"]
    check = veritysetup_verify(blob, table)
    assert check.returncode == 0, check.stderr
    # Our superblock is still there and says the same (containerd's sidecar reads it).
    by_superblock = subprocess.run(
        ["veritysetup", "verify", str(blob), str(blob), info.root_hash,
         f"--hash-offset={info.hash_offset}"], capture_output=True, text=True)
    assert by_superblock.returncode == 0, by_superblock.stderr


@pytest.mark.qemu
@pytest.mark.root
@pytest.mark.slow
def test_the_table_every_reader_derives_opens_the_layer_in_a_guest(
        tmp_path: Path, agent: AgentClient, attacher: Attacher) -> None:
    """What the Kata agent does with the volume, in a real guest kernel: the layer hotplugged
    as a virtio disk, the readers' one table loaded with `dmsetup create` on it (the disk is
    data and hash device both, as the agent names the source twice), then the EROFS on the
    dm device mounted and its files read through dm-verity."""
    tar, diff_id, files = _layer_tar(tmp_path)
    blob = tmp_path / "layer.erofs"
    info = convert_layer(tar, blob, expected_diff_id=diff_id, verity=KATA_VERITY).verity
    tables = tables_of(_layer_option(info, blob))
    assert len(set(tables.values())) == 1, tables
    att = attacher.attach(blob, "virtio-blk")
    disk = find_disk(agent, att)["path"]
    name = "kata-readers"
    dmsetup = ("env", "DM_DISABLE_UDEV=1", "dmsetup")  # no udev in the guest: dmsetup makes nodes
    created = agent.run(*dmsetup, "create", name, "--readonly", "--table",
                        tables["kata-types"].replace(DEVICE, disk))
    assert created["rc"] == 0, created["stderr"]
    try:
        mnt = agent.mount(f"/dev/mapper/{name}")
        try:
            for rel, data in files.items():
                assert agent.read_file(f"{mnt}/{rel}") == data
            status = agent.run("dmsetup", "status", name)["stdout"]
            assert status.split()[3] == "V", status  # dm-verity: no corruption seen
        finally:
            agent.umount(mnt)
    finally:
        agent.run(*dmsetup, "remove", name)


def test_a_salted_tree_is_refused_unless_only_kata_types_reads_it(tmp_path):
    """Why a tree for Kata has no salt: with one, the readers that carry none load a table
    that does not verify. Asking for Kata options of such a tree is a clear error; a caller
    that knows only kata-types reads the options can have them, salt included."""
    require_tool("veritysetup")
    blob, info = _blob(tmp_path, 40 * 4096, VerityParams(salt=b"\x17" * 32))
    with pytest.raises(EpError, match="has a salt, which Kata's runtime-go"):
        info.kata_dm_verity()
    option = volumes_from_devices(
        [{"role": "layer", "path": str(blob), "verity": info.to_json()}],
        kata_types_only=True)[0].to_option()
    tables = tables_of(option)
    assert veritysetup_verify(blob, tables["kata-types"]).returncode == 0
    for reader in ("runtime-go", "kata-agent-2023", "image-rs"):
        assert tables[reader].endswith(" -")
        assert veritysetup_verify(blob, tables[reader]).returncode != 0, reader


def test_only_sha256_trees_get_kata_options(tmp_path):
    _, info = _blob(tmp_path, 8 * 4096, VerityParams(hash_name="sha512", unsalted=True))
    with pytest.raises(EpError, match="Kata cannot read a sha512 dm-verity tree"):
        info.kata_dm_verity()
    # ... because runtime-go and image-rs refuse it (runtime-go: the whole container).
    wire = {"hashtype": "sha512", "hash": info.root_hash, "blocknum": 8, "blocksize": 4096,
            "hashsize": 4096, "offset": info.hash_start_block * 4096, "no_superblock": True}
    for reader in (runtime_go, image_rs):
        with pytest.raises(Refused, match="unsupported hash algorithm sha512"):
            reader(wire)


def test_a_tree_in_another_file_gets_no_kata_options(tmp_path):
    """Kata names the volume's source as data and hash device both: a tree kept in a
    separate file cannot be described, and saying so beats a device that fails reads."""
    data = tmp_path / "data"
    data.write_bytes(bytes(8 * 4096))
    info = format_file(data, hash_path=tmp_path / "hash", params=KATA_VERITY)
    with pytest.raises(EpError, match="tree appended to the data on one device"):
        info.kata_dm_verity()


def test_the_old_option_meant_two_trees(tmp_path):
    """The option this project wrote before (offset = the superblock, no no_superblock):
    kata-types and the older readers disagree by one block, and only one of them verifies.
    The decoders above tell the two apart; our producer no longer writes it."""
    require_tool("veritysetup")
    blob, info = _blob(tmp_path, 10 * 4096, KATA_VERITY)
    old = {"hashtype": "sha256", "hash": info.root_hash, "blocknum": info.data_blocks,
           "blocksize": 4096, "hashsize": 4096, "offset": info.hash_offset}
    tables = {name: read(old) for name, read in READERS.items()}
    assert tables["kata-types"] != tables["image-rs"]
    assert veritysetup_verify(blob, tables["kata-types"]).returncode == 0
    assert veritysetup_verify(blob, tables["image-rs"]).returncode != 0
    assert info.kata_dm_verity().offset == info.hash_offset + 4096


def test_unsalted_parameters_refuse_a_salt():
    with pytest.raises(EpError, match="ask for an unsalted tree but give a salt"):
        VerityParams(salt=b"\x01", unsalted=True).validate()


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
        salt = head[88:88 + size].hex() if 0 < size <= 256 else zero_salt
    else:
        salt = zero_salt
    fields = {"hashtype": "sha256", "hash": sidecar["roothash"], "blocknum": offset // 4096,
              "blocksize": 4096, "hashsize": 4096, "offset": offset}
    return kata_types({**fields, "no_superblock": not has_superblock,
                       **({"salt": salt} if salt not in ("", "-") else {})})


def test_runtime_rs_sidecar_path_reads_an_unsalted_tree_only_with_an_explicit_salt(tmp_path):
    """What a snapshotter serving Kata's runtime-rs through containerd's sidecars has to know:
    the volume-option readers need a tree without salt, but runtime-rs' sidecar path turns
    "no salt in the superblock" into containerd's all-zero salt, so for an unsalted tree the
    sidecar must say `"salt": "-"` (containerd ignores the extra key). Salted trees need
    nothing: runtime-rs reads their salt from the superblock."""
    require_tool("veritysetup")
    blob, salted = _blob(tmp_path, 30 * 4096, VerityParams(salt=b"\x42" * 32))
    table = runtime_rs_sidecar(blob, salted.containerd_sidecar())
    assert veritysetup_verify(blob, table).returncode == 0
    blob, unsalted = _blob(tmp_path, 30 * 4096, KATA_VERITY)
    containerd_only = {k: unsalted.containerd_sidecar()[k] for k in ("roothash", "hashoffset")}
    table = runtime_rs_sidecar(blob, containerd_only)
    assert table.endswith(" " + "00" * 32)
    assert veritysetup_verify(blob, table).returncode != 0
    assert unsalted.containerd_sidecar() == {**containerd_only, "salt": "-"}  # what we write
    table = runtime_rs_sidecar(blob, unsalted.containerd_sidecar())
    assert table == tables_of(_layer_option(unsalted, blob))["kata-types"]
    assert veritysetup_verify(blob, table).returncode == 0


# -- the service's kata_verity setting -------------------------------------------------------

@pytest.mark.root
def test_serve_kata_verity_makes_a_vm_mode_image_every_reader_verifies(tmp_path):
    """`kata_verity = true` (serve's config) reaches every tree the service makes: the layers
    Commit converts and the chain's fsmeta. The VM-mode plan's Kata options then need no
    kata-types-only opt-in, and each reader's table verifies each device with veritysetup."""
    from shim_integration.shim import plan_from_mounts
    from snapshotter.service.snapshots import Snapshotter
    from snapshotter.service.vm_mode import VM_MODE_LABEL
    from tests.support.helpers import require_root

    require_root()
    require_tool("veritysetup")
    sn = Snapshotter(tmp_path / "root", kata_verity=True)
    try:
        parent = ""
        for i in (1, 2):
            key = f"default/{i}/extract-{i}"
            mounts = sn.prepare(key, parent)
            upper = next(Path(o.split("=", 1)[1]) for m in mounts for o in m.options
                         if o.startswith("upperdir=")) if mounts[0].type == "overlay" \
                else Path(mounts[0].source)
            (upper / f"layer{i}").write_bytes(bytes([i]) * (7000 * i))
            parent = f"default/{i}/sha256:{i}"
            sn.commit(parent, key)
            assert sn.stat(parent).labels["containerd.io/snapshot/erofs.verity.salt"] == "-"
        mounts = sn.prepare("default/3/rootfs", parent, {VM_MODE_LABEL: "true"})
        plan = plan_from_mounts(mounts, manifest=b"{}", signature=b"{}")
        options = plan.kata_options()  # refused for salted trees: see the test above
        assert [d.role for d in plan.devices] == ["fsmeta", "layer", "layer"]
        for device, option in zip(plan.devices, options, strict=True):
            tables = tables_of(option)
            assert len(set(tables.values())) == 1, (device.path, tables)
            assert tables["runtime-go"].endswith(f" {device.root_hash} -")
            check = veritysetup_verify(Path(device.path), tables["kata-types"])
            assert check.returncode == 0, (device.path, check.stderr)
    finally:
        for key in ("default/3/rootfs", "default/2/sha256:2", "default/1/sha256:1"):
            with contextlib.suppress(EpError):
                sn.remove(key)
        sn.close()
