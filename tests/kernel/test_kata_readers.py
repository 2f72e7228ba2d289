"""Our Kata volume options and sidecars, read the way each Kata component reads them
(tests/support/kata_readers.py: the readers and their rules): all readers derive one table,
and the real veritysetup verifies the blob by it. The same table opened through a guest
kernel's dm-verity: tests/vm/test_kata_guest.py."""

from __future__ import annotations

import contextlib
import re
import subprocess
from pathlib import Path

import pytest

from shim_integration.kata_volume import volumes_from_devices
from snapshotter.errors import EpError
from snapshotter.ingest.convert import convert_directory, convert_layer, import_erofs_image
from snapshotter.verity import KATA_VERITY, VerityInfo, VerityParams, format_file
from tests.support.helpers import require_tool
from tests.support.kata_readers import (
    DEVICE,
    READERS,
    Refused,
    image_rs,
    layer_option,
    runtime_go,
    runtime_rs_sidecar,
    sample_layer_tar,
    tables_of,
)
from tests.support.verity import veritysetup_verify


def _blob(tmp_path: Path, size: int, params: VerityParams) -> tuple[Path, VerityInfo]:
    blob = tmp_path / "layer.erofs"
    blob.write_bytes(bytes((i * 131 + 7) % 251 for i in range(size)))
    return blob, format_file(blob, params=params)


@pytest.mark.parametrize("size", [4096, 10 * 4096 + 1, 300 * 4096])
def test_every_kata_reader_derives_one_table_that_verifies(tmp_path, size):
    require_tool("veritysetup")
    blob, info = _blob(tmp_path, size, VerityParams(salt=b""))
    tables = tables_of(layer_option(info, blob))
    assert len(set(tables.values())) == 1, tables
    table = tables["kata-types"]
    assert table == info.table_line(DEVICE, DEVICE)
    assert veritysetup_verify(blob, table=table).returncode == 0
    # The check can fail: one flipped data byte and veritysetup refuses the same table.
    data = bytearray(blob.read_bytes())
    data[size // 2] ^= 1
    blob.write_bytes(data)
    flipped = veritysetup_verify(blob, table=table)
    assert flipped.returncode != 0
    assert re.search(r"corrupt|verification .* failed", flipped.stderr, re.I), flipped.stderr


@pytest.mark.parametrize("how", ["tar", "directory", "native"])
def test_a_layer_converted_for_kata_verifies_by_every_readers_table(tmp_path, how):
    """The conversions the service runs, with the parameters it uses for Kata: no salt, the
    tree appended behind its superblock; Kata's options for it; the one table all readers
    derive, checked by veritysetup (and in a guest kernel by the test below)."""
    require_tool("veritysetup")
    tar, diff_id, _files = sample_layer_tar(tmp_path)
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
    tables = tables_of(layer_option(info, blob))
    assert len(set(tables.values())) == 1, tables
    table = tables["runtime-go"]
    check = veritysetup_verify(blob, table=table)
    assert check.returncode == 0, check.stderr
    # Our superblock is still there and says the same (containerd's sidecar reads it).
    by_superblock = subprocess.run(
        [
            "veritysetup",
            "verify",
            str(blob),
            str(blob),
            info.root_hash,
            f"--hash-offset={info.hash_offset}",
        ],
        capture_output=True,
        text=True,
    )
    assert by_superblock.returncode == 0, by_superblock.stderr


def test_a_salted_tree_is_refused_unless_only_kata_types_reads_it(tmp_path):
    """Why a tree for Kata has no salt: with one, the readers that carry none load a table
    that does not verify. Asking for Kata options of such a tree is a clear error; a caller
    that knows only kata-types reads the options can have them, salt included."""
    require_tool("veritysetup")
    blob, info = _blob(tmp_path, 40 * 4096, VerityParams(salt=b"\x17" * 32))
    with pytest.raises(EpError, match="has a salt, which Kata's runtime-go"):
        info.kata_dm_verity()
    option = volumes_from_devices(
        [{"role": "layer", "path": str(blob), "verity": info.to_json()}], kata_types_only=True
    )[0].to_option()
    tables = tables_of(option)
    assert veritysetup_verify(blob, table=tables["kata-types"]).returncode == 0
    for reader in ("runtime-go", "kata-agent-2023", "image-rs"):
        assert tables[reader].endswith(" -")
        assert veritysetup_verify(blob, table=tables[reader]).returncode != 0, reader


def test_only_sha256_trees_get_kata_options(tmp_path):
    _, info = _blob(tmp_path, 8 * 4096, VerityParams(hash_name="sha512", unsalted=True))
    with pytest.raises(EpError, match="Kata cannot read a sha512 dm-verity tree"):
        info.kata_dm_verity()
    # ... because runtime-go and image-rs refuse it (runtime-go: the whole container).
    wire = {
        "hashtype": "sha512",
        "hash": info.root_hash,
        "blocknum": 8,
        "blocksize": 4096,
        "hashsize": 4096,
        "offset": info.hash_start_block * 4096,
        "no_superblock": True,
    }
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
    old = {
        "hashtype": "sha256",
        "hash": info.root_hash,
        "blocknum": info.data_blocks,
        "blocksize": 4096,
        "hashsize": 4096,
        "offset": info.hash_offset,
    }
    tables = {name: read(old) for name, read in READERS.items()}
    assert tables["kata-types"] != tables["image-rs"]
    assert veritysetup_verify(blob, table=tables["kata-types"]).returncode == 0
    assert veritysetup_verify(blob, table=tables["image-rs"]).returncode != 0
    assert info.kata_dm_verity().offset == info.hash_offset + 4096


def test_unsalted_parameters_refuse_a_salt():
    with pytest.raises(EpError, match="ask for an unsalted tree but give a salt"):
        VerityParams(salt=b"\x01", unsalted=True).validate()


def test_runtime_rs_sidecar_path_reads_an_unsalted_tree_only_with_an_explicit_salt(tmp_path):
    """What a snapshotter serving Kata's runtime-rs through containerd's sidecars has to know:
    the volume-option readers need a tree without salt, but runtime-rs' sidecar path turns
    "no salt in the superblock" into containerd's all-zero salt, so for an unsalted tree the
    sidecar must say `"salt": "-"` (containerd ignores the extra key). Salted trees need
    nothing: runtime-rs reads their salt from the superblock."""
    require_tool("veritysetup")
    blob, salted = _blob(tmp_path, 30 * 4096, VerityParams(salt=b"\x42" * 32))
    table = runtime_rs_sidecar(blob, salted.containerd_sidecar())
    assert veritysetup_verify(blob, table=table).returncode == 0
    blob, unsalted = _blob(tmp_path, 30 * 4096, KATA_VERITY)
    containerd_only = {k: unsalted.containerd_sidecar()[k] for k in ("roothash", "hashoffset")}
    table = runtime_rs_sidecar(blob, containerd_only)
    assert table.endswith(" " + "00" * 32)
    assert veritysetup_verify(blob, table=table).returncode != 0
    assert unsalted.containerd_sidecar() == {**containerd_only, "salt": "-"}  # what we write
    table = runtime_rs_sidecar(blob, unsalted.containerd_sidecar())
    assert table == tables_of(layer_option(unsalted, blob))["kata-types"]
    assert veritysetup_verify(blob, table=table).returncode == 0


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
            upper = (
                next(
                    Path(o.split("=", 1)[1])
                    for m in mounts
                    for o in m.options
                    if o.startswith("upperdir=")
                )
                if mounts[0].type == "overlay"
                else Path(mounts[0].source)
            )
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
            check = veritysetup_verify(Path(device.path), table=tables["kata-types"])
            assert check.returncode == 0, (device.path, check.stderr)
    finally:
        for key in ("default/3/rootfs", "default/2/sha256:2", "default/1/sha256:1"):
            with contextlib.suppress(EpError):
                sn.remove(key)
        sn.close()
