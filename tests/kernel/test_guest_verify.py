"""The guest's checks, run on the host against real files: the root hash a device carries (read
from its tree's top block) equals what our converter and veritysetup computed, every way a
device can fail to be the signed one is named, and the trusted keys the launcher puts on the
kernel command line are the ones the guest reads back."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from passthrough.agent_protocol import encode_trusted_keys
from passthrough.guest.verify import (
    check_offered,
    device_root,
    signed_verity,
    trusted_keys_from_cmdline,
)
from passthrough.vm import Vm, VmConfig
from snapshotter.manifest import (
    ManifestError,
    build_manifest,
    generate_key,
    key_id,
    load_private_key,
    sign,
    verify,
)
from snapshotter.verity import VerityInfo
from tests.support.helpers import require_tool

CLI = [sys.executable, "-m", "shim_integration.cli"]


def _verity_format(path: Path, *extra: str) -> dict[str, Any]:
    proc = subprocess.run(
        [*CLI, "verity", "format", str(path), "--json", *extra],
        capture_output=True,
        text=True,
        check=True,
    )
    info = json.loads(proc.stdout)
    info = info.get("verity", info)
    info["data_blocks"] = info["hash_offset"] // info["data_block_size"]
    return info


@pytest.fixture
def blobs(tmp_path: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Three files with appended trees: many blocks (several levels), a few, and one."""
    out = []
    for name, size in (("big", 600 * 4096), ("small", 3 * 4096), ("one", 4096)):
        path = tmp_path / f"{name}.img"
        path.write_bytes(bytes((i * 7 + len(name)) % 251 for i in range(size)))
        out.append((path, _verity_format(path)))
    return out


def test_device_root_is_the_root_veritysetup_computes(blobs: list) -> None:
    veritysetup = require_tool("veritysetup")
    for path, info in blobs:
        assert device_root(str(path), info) == info["root_hash"], path.name
        # and veritysetup agrees the tree under that root is the device's
        subprocess.run(
            [
                veritysetup,
                "verify",
                str(path),
                str(path),
                info["root_hash"],
                f"--hash-offset={info['hash_offset']}",
            ],
            check=True,
            capture_output=True,
        )


def test_a_changed_top_block_or_salt_is_another_root(blobs: list, tmp_path: Path) -> None:
    path, info = blobs[0]
    start = signed_verity(info).hash_start_block * 4096
    bad = tmp_path / "bad.img"
    shutil.copyfile(path, bad)
    with open(bad, "r+b") as fh:
        fh.seek(start + 5)
        byte = fh.read(1)
        fh.seek(start + 5)
        fh.write(bytes([byte[0] ^ 1]))
    assert device_root(str(bad), info) != info["root_hash"]
    resalted = tmp_path / "resalted.img"
    resalted.write_bytes(path.read_bytes()[: info["hash_offset"]])
    other = _verity_format(resalted, "--salt", "00" * 32)
    with pytest.raises(ManifestError, match="not the signed geometry"):
        device_root(str(resalted), info)  # the signed salt is not this tree's
    assert device_root(str(resalted), other) == other["root_hash"] != info["root_hash"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"hash_offset": 4096}, "no dm-verity superblock at byte 4096"),
        ({"hash_offset": 4096 * 4000}, "the disk has .* bytes, the signed image at least"),
        ({"data_blocks": 599}, "not the signed geometry"),
        ({"hash_name": "sha1"}, "unsupported hash"),
    ],
)
def test_a_device_without_the_signed_tree_is_named(blobs: list, change: dict, message: str) -> None:
    path, info = blobs[0]
    with pytest.raises(ManifestError, match=message):
        device_root(str(path), {**info, **change})


def _signed(blobs: list, key: Path) -> Any:
    def entry(info: dict[str, Any]) -> dict[str, Any]:
        return VerityInfo.from_json(info).signed_entry()

    manifest = build_manifest(
        {"name": "t"},
        [{"verity": entry(i)} for _, i in blobs[1:]],
        fsmeta={"verity": entry(blobs[0][1]), "tags": []},
    )
    payload, signature = sign(manifest, load_private_key(key))
    return verify(payload, signature, [load_private_key(key).public_key()])


def test_check_offered_names_the_position_and_disk(blobs: list, tmp_path: Path) -> None:
    generate_key(tmp_path / "k")
    signed = _signed(blobs, tmp_path / "k")
    paths = [str(p) for p, _ in blobs]
    labels = ["vdb", "vdc", "vdd"]
    assert check_offered(signed, paths, labels) == [i["root_hash"] for _, i in blobs]
    with pytest.raises(ManifestError, match=r"device 1 \(vdc\): .*not the signed device"):
        check_offered(signed, [paths[0], paths[2], paths[1]], labels)
    with pytest.raises(ManifestError, match=r"fsmeta \(vdb\)"):
        check_offered(signed, [paths[1], paths[0], paths[2]], labels)
    with pytest.raises(ManifestError, match="2 devices offered, the manifest names 3"):
        check_offered(signed, paths[:2], labels[:2])


def test_trusted_keys_from_the_launchers_command_line(tmp_path: Path) -> None:
    pems = []
    for name, algorithm in (("a", "ed25519"), ("b", "ecdsa-p256")):
        generate_key(tmp_path / name, algorithm)
        pems.append((tmp_path / f"{name}.pub").read_bytes())
    line = Vm(
        VmConfig(kernel=Path("/nonexistent"), trusted_keys=pems), workdir=tmp_path
    ).command_line()
    assert encode_trusted_keys(pems) in line.split()
    keys = trusted_keys_from_cmdline(line)
    assert [key_id(k) for k in keys] == [
        key_id(load_private_key(tmp_path / n).public_key()) for n in ("a", "b")
    ]
    assert trusted_keys_from_cmdline("quiet ep.root=x") == []
    with pytest.raises(ManifestError, match="not base64"):
        trusted_keys_from_cmdline("ep.trusted_keys=!!!")
    junk = base64.b64encode(b"-----BEGIN PUBLIC KEY-----\nAAAA\n").decode()
    with pytest.raises(ManifestError, match="not a usable public key"):
        trusted_keys_from_cmdline(f"ep.trusted_keys={junk}")


def test_too_many_keys_do_not_fit_the_command_line(tmp_path: Path) -> None:
    from passthrough.errors import VmFailure

    generate_key(tmp_path / "k")
    pem = (tmp_path / "k.pub").read_bytes()
    with pytest.raises(VmFailure, match=re.escape("exceeds 2047")):
        Vm(
            VmConfig(kernel=Path("/nonexistent"), trusted_keys=[pem] * 20), workdir=tmp_path
        ).command_line()
