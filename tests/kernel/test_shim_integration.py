"""Kata volume descriptions and signed manifests, host side: formats round-trip with Kata's
field names and types, and every way a manifest can be wrong is refused with a reason."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from shim_integration.kata_volume import (
    IMAGE_RAW_BLOCK,
    KATA_VOLUME_OPTION,
    LAYER_RAW_BLOCK,
    DmVerityInfo,
    KataVirtualVolume,
    volumes_from_devices,
)
from snapshotter.errors import EpError
from snapshotter.manifest import (
    ManifestError,
    build_manifest,
    check_devices,
    generate_key,
    load_private_key,
    load_public_key,
    sign,
    verify,
)

ROOT = "ab" * 32

# What Kata's serde and nydus-snapshotter's Go structs produce for a tarfs image volume.
KATA_JSON = {
    "volume_type": "image_raw_block",
    "source": "/var/lib/nydus/cache/abc.image.disk",
    "fs_type": "erofs",
    "options": ["ro"],
    "dm_verity": {
        "hashtype": "sha256",
        "hash": ROOT,
        "blocknum": 1024,
        "blocksize": 512,
        "hashsize": 4096,
        "offset": 524288,
    },
}


def test_kata_volume_round_trips_with_kata_names_and_types() -> None:
    option = f"{KATA_VOLUME_OPTION}={base64.b64encode(json.dumps(KATA_JSON).encode()).decode()}"
    volume = KataVirtualVolume.from_option(option)
    assert volume.volume_type == IMAGE_RAW_BLOCK and volume.dm_verity.blocknum == 1024
    assert volume.to_json() == KATA_JSON
    again = KataVirtualVolume.from_option(volume.to_option())
    assert again == volume
    # Empty fields are omitted, as serde's skip_serializing_if does.
    assert KataVirtualVolume("image_guest_pull", source="docker.io/x").to_json() == {
        "volume_type": "image_guest_pull",
        "source": "docker.io/x",
    }


def test_unknown_fields_are_kept() -> None:
    data = {
        **KATA_JSON,
        "future_field": {"x": 1},
        "dm_verity": {**KATA_JSON["dm_verity"], "salt": "00" * 32, "new_knob": True},
    }
    volume = KataVirtualVolume.from_json(data)
    assert volume.to_json() == data


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (f"{KATA_VOLUME_OPTION}=!!!not-base64", "bad base64"),
        (f"{KATA_VOLUME_OPTION}={base64.b64encode(b'{nope').decode()}", "bad JSON"),
        (f"{KATA_VOLUME_OPTION}={base64.b64encode(b'[1]').decode()}", "JSON object"),
        ("io.other=abc", "not a Kata volume option"),
    ],
)
def test_bad_options_are_clear_errors(option: str, message: str) -> None:
    with pytest.raises(EpError, match=message):
        KataVirtualVolume.from_option(option)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"hash": "zz" * 32}, "not hex"),
        ({"hash": "ab" * 10}, "64 hex digits"),
        ({"hashtype": "md5"}, "does not accept hash algorithm 'md5'"),
        ({"hashtype": "sha512", "hash": "ab" * 64}, "does not accept hash algorithm 'sha512'"),
        ({"hash_type": 0}, "only format 1"),
        ({"salt": "xyz"}, "salt 'xyz' is not hex"),
        ({"no_superblock": "yes"}, "must be a bool"),
        ({"blocknum": 0}, "block count"),
        ({"blocksize": 1000}, "power of two"),
        ({"offset": 100}, "hash offset"),
        ({"blocknum": "12"}, "must be an integer"),
    ],
)
def test_bad_dm_verity_is_refused(change: dict, message: str) -> None:
    with pytest.raises(EpError, match=message):
        DmVerityInfo.from_json({**KATA_JSON["dm_verity"], **change})


def _verity(root: str, salt: str, hash_offset: int) -> dict:
    """A device's verity description as VM-mode mounts carry it (VerityInfo.to_json)."""
    from snapshotter.verity import VerityInfo

    return VerityInfo(
        root, salt, "sha256", 4096, 4096, hash_offset // 4096, hash_offset, True, None
    ).to_json()


def _devices(fsmeta_salt: str = "", layer_salt: str = "") -> list[dict]:
    return [
        {
            "role": "fsmeta",
            "path": "/s/fsmeta",
            "root_hash": ROOT,
            "verity": _verity(ROOT, fsmeta_salt, 8192),
        },
        {
            "role": "layer",
            "device": 1,
            "path": "/s/1/layer.erofs",
            "root_hash": "cd" * 32,
            "verity": _verity("cd" * 32, layer_salt, 40960),
        },
    ]


def test_volumes_from_vm_mode_devices() -> None:
    volumes = volumes_from_devices(_devices())
    assert [v.volume_type for v in volumes] == [IMAGE_RAW_BLOCK, LAYER_RAW_BLOCK]
    # offset: the tree's start (one block past the superblock at 40960), not the superblock's
    assert volumes[1].dm_verity.to_json() == {
        "hashtype": "sha256",
        "hash": "cd" * 32,
        "blocknum": 10,
        "blocksize": 4096,
        "hashsize": 4096,
        "offset": 45056,
        "no_superblock": True,
    }
    for v in volumes:
        assert KataVirtualVolume.from_option(v.to_option()) == v


def test_salted_trees_give_kata_options_only_when_asked_for_kata_types() -> None:
    with pytest.raises(EpError, match=r"^/s/1/layer\.erofs: this dm-verity tree has a salt"):
        volumes_from_devices(_devices(layer_salt="22" * 32))
    volumes = volumes_from_devices(_devices("11" * 32, "22" * 32), kata_types_only=True)
    assert [v.dm_verity.salt for v in volumes] == ["11" * 32, "22" * 32]
    assert volumes[1].dm_verity.to_json()["offset"] == 45056


# -- manifests ------------------------------------------------------------------------------


def _manifest(roots: list[str]) -> dict:
    verity = lambda r: {"root_hash": r, "salt": "00", "data_blocks": 2, "hash_offset": 8192}  # noqa: E731
    return build_manifest(
        {"name": "demo:1"},
        [{"diff_id": f"sha256:{i}", "verity": verity(r)} for i, r in enumerate(roots[1:])],
        fsmeta={"verity": verity(roots[0]), "tags": ["t1"]},
    )


@pytest.mark.parametrize("algorithm", ["ed25519", "ecdsa-p256"])
def test_sign_and_verify(tmp_path: Path, algorithm: str) -> None:
    kid = generate_key(tmp_path / "key", algorithm)
    assert stat.S_IMODE(os.stat(tmp_path / "key").st_mode) == 0o600
    private = load_private_key(tmp_path / "key")
    public = load_public_key((tmp_path / "key.pub").read_bytes())
    roots = [ROOT, "cd" * 32, "ef" * 32]
    payload, signature = sign(_manifest(roots), private)
    assert signature["key_id"] == kid
    signed = verify(payload, json.dumps(signature).encode(), [public])
    check_devices(signed, roots)
    with pytest.raises(ManifestError, match="device 1"):
        check_devices(signed, [ROOT, "ef" * 32, "cd" * 32])  # swapped devices
    with pytest.raises(ManifestError, match="devices offered"):
        check_devices(signed, roots[:2])


def test_every_bad_signature_is_refused_with_a_reason(tmp_path: Path) -> None:
    generate_key(tmp_path / "good")
    generate_key(tmp_path / "other")
    good = load_private_key(tmp_path / "good")
    trusted = [good.public_key()]
    payload, signature = sign(_manifest([ROOT, "cd" * 32]), good)
    with pytest.raises(ManifestError, match="untrusted key"):
        verify(*sign(_manifest([ROOT, "cd" * 32]), load_private_key(tmp_path / "other")), trusted)
    raw = json.dumps(signature).encode()
    with pytest.raises(ManifestError, match="truncated"):
        verify(payload, raw[: len(raw) // 2], trusted)
    short = {**signature, "signature": signature["signature"][:20]}
    with pytest.raises(ManifestError, match=r"base64|does not verify"):
        verify(payload, short, trusted)
    tampered = payload.replace(b"cdcd", b"cdce", 1)
    with pytest.raises(ManifestError, match="does not verify"):
        verify(tampered, signature, trusted)


def test_key_cli(tmp_path: Path) -> None:
    cli = [sys.executable, "-m", "shim_integration.cli", "key"]
    out = json.loads(
        subprocess.run(
            [*cli, "generate", str(tmp_path / "k"), "--json"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    shown = json.loads(
        subprocess.run(
            [*cli, "show", str(tmp_path / "k.pub"), "--json"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    assert shown["key_id"] == out["key_id"]
    again = subprocess.run([*cli, "generate", str(tmp_path / "k")], capture_output=True, text=True)
    assert again.returncode != 0 and "exists" in again.stderr


# -- the shim's attach plan ---------------------------------------------------------------------


def _described_mount(fsmeta: Path, devices: list[dict]):
    """A VM-mode mount as the snapshotter hands it out: the description beside the fsmeta."""
    from snapshotter.fsmeta.devices import MOUNT_TYPE, encode_description_option
    from snapshotter.service.mounts import Mount

    description = fsmeta.parent / "fsmeta.json"
    description.write_text(json.dumps({"fsmeta": devices[0], "layers": devices[1:]}))
    return Mount(MOUNT_TYPE, str(fsmeta), ["ro", encode_description_option(description)])


def _vm_mount(tmp_path: Path, with_manifest: bool = True):

    fsmeta = tmp_path / "image.fsmeta"
    devices = [
        {
            "role": "fsmeta",
            "path": str(fsmeta),
            "root_hash": ROOT,
            "verity": _verity(ROOT, "", 8192),
        },
        *(
            {
                "role": "layer",
                "device": i,
                "path": str(tmp_path / f"{i}.erofs"),
                "root_hash": f"{i:02x}" * 32,
                "verity": _verity(f"{i:02x}" * 32, "", 40960),
            }
            for i in (1, 2)
        ),
    ]
    if with_manifest:
        (tmp_path / "manifest.json").write_bytes(b"{}")
        (tmp_path / "manifest.sig").write_bytes(b"{}")
    return _described_mount(fsmeta, devices), devices


def test_attach_plan_from_vm_mode_mounts(tmp_path: Path) -> None:
    from passthrough.attach import Attachment, device_id_for
    from shim_integration.shim import plan_from_mounts

    mount, devices = _vm_mount(tmp_path)
    plan = plan_from_mounts([mount], ["virtio-blk", "vhost-user-blk", "virtio-blk"])
    assert [(d.position, d.role, d.path, d.root_hash) for d in plan.devices] == [
        (i, d["role"], d["path"], d["root_hash"]) for i, d in enumerate(devices)
    ]
    assert plan.devices[0].serial == device_id_for(devices[0]["path"], "virtio-blk")
    assert plan.devices[1].serial == "vhost_user_blk"  # found by PCI address instead
    assert plan.manifest == b"{}" and plan.signature == b"{}"
    # Kata's options for the same devices, in the same order
    volumes = [KataVirtualVolume.from_option(o) for o in plan.kata_options()]
    assert [v.volume_type for v in volumes] == [IMAGE_RAW_BLOCK, LAYER_RAW_BLOCK, LAYER_RAW_BLOCK]
    assert [v.dm_verity.hash for v in volumes] == [d["root_hash"] for d in devices]
    # the agent request names each disk as the guest finds it
    atts = [
        Attachment(
            d.device_id,
            d.transport,
            d.path,
            f"ep-rp{i}",
            f"0000:00:08.{i}",
            d.serial,
            f"{d.device_id}-node",
        )
        for i, d in enumerate(plan.devices)
    ]
    req = plan.request("c1", atts)
    assert req["devices"] == [
        {"serial": atts[0].serial},
        {"pci": "0000:00:08.1"},
        {"serial": atts[2].serial},
    ]
    assert base64.b64decode(req["manifest"]) == b"{}" and req["name"] == "c1"
    swapped = plan.with_paths([devices[0]["path"], devices[2]["path"], devices[1]["path"]])
    assert [d.path for d in swapped.devices][1:] == [devices[2]["path"], devices[1]["path"]]
    assert swapped.devices[1].root_hash == plan.devices[1].root_hash  # the claim stays


def test_attach_plan_refuses_what_it_cannot_use(tmp_path: Path) -> None:
    from shim_integration.shim import ShimError, plan_from_mounts
    from snapshotter.service.mounts import Mount

    overlay = Mount("overlay", "overlay", ["lowerdir=/a:/b"])
    with pytest.raises(ShimError, match="not a VM-mode rootfs"):
        plan_from_mounts([overlay])
    with pytest.raises(ShimError, match="not a VM-mode rootfs"):
        plan_from_mounts([Mount("erofs", "/x/layer.erofs", ["ro", "loop"])])
    mount, _ = _vm_mount(tmp_path, with_manifest=False)
    # the description is read from the fsmeta's own chain directory only
    elsewhere = tmp_path / "other"
    elsewhere.mkdir()
    (elsewhere / "fsmeta.json").write_text((tmp_path / "fsmeta.json").read_text())
    for description, why in [
        (elsewhere / "fsmeta.json", "not fsmeta.json in the chain"),
        (tmp_path / "manifest.json", "not fsmeta.json in the chain"),
        (tmp_path / "other" / ".." / "fsmeta.json", "not fsmeta.json"),
    ]:
        with pytest.raises(ShimError, match=why):
            plan_from_mounts(
                [
                    Mount(
                        mount.type,
                        mount.source,
                        ["ro", f"erofs-passthrough.description={description}"],
                    )
                ]
            )
    (tmp_path / "fsmeta.json").rename(tmp_path / "real.json")
    (tmp_path / "fsmeta.json").symlink_to(elsewhere / "fsmeta.json")
    with pytest.raises(ShimError, match="leads outside"):
        plan_from_mounts([mount])
    (tmp_path / "fsmeta.json").unlink()
    (tmp_path / "real.json").rename(tmp_path / "fsmeta.json")
    with pytest.raises(ShimError, match=r"0 erofs-passthrough\.description options"):
        plan_from_mounts([Mount(mount.type, mount.source, ["ro"])])
    with pytest.raises(ShimError, match="no signed manifest beside the fsmeta"):
        plan_from_mounts([mount])
    assert plan_from_mounts([mount], manifest=b"m", signature=b"s").manifest == b"m"
    with pytest.raises(ShimError, match="transports"):
        plan_from_mounts([mount], ["virtio-blk"], manifest=b"m", signature=b"s")


def test_kata_options_of_a_vm_mode_plan_verify_each_device_for_every_reader(tmp_path) -> None:
    """A VM-mode image built for Kata (layers and fsmeta without salt): the plan's Kata
    options, decoded by each of Kata's readers (tests/kernel/test_kata_readers.py), give every
    device one table, and that table verifies the device's file with veritysetup."""
    from shim_integration.shim import plan_from_mounts
    from snapshotter.fsmeta.merge import merge_layers
    from snapshotter.ingest.convert import convert_directory
    from snapshotter.verity import KATA_VERITY, format_file
    from tests.support.helpers import require_tool
    from tests.support.kata_readers import DEVICE, tables_of
    from tests.support.verity import veritysetup_verify

    require_tool("veritysetup")
    devices = []
    for i in (1, 2):
        src = tmp_path / f"src{i}"
        (src / "etc").mkdir(parents=True)
        (src / "etc" / f"layer{i}").write_bytes(bytes([i]) * (5000 * i))
        blob = tmp_path / f"{i}.erofs"
        info = convert_directory(src, blob, verity=KATA_VERITY).verity
        devices.append(
            {
                "role": "layer",
                "device": i,
                "path": str(blob),
                "root_hash": info.root_hash,
                "verity": info.to_json(),
            }
        )
    fsmeta = tmp_path / "image.fsmeta"
    merge_layers([Path(d["path"]) for d in devices], fsmeta)
    info = format_file(fsmeta, params=KATA_VERITY)  # the tree appended, as serve's is
    devices.insert(
        0,
        {
            "role": "fsmeta",
            "path": str(fsmeta),
            "root_hash": info.root_hash,
            "verity": info.to_json(),
        },
    )
    plan = plan_from_mounts([_described_mount(fsmeta, devices)], manifest=b"{}", signature=b"{}")
    options = plan.kata_options()
    assert len(options) == 3
    for device, option in zip(devices, options, strict=True):
        tables = tables_of(option)
        assert len(set(tables.values())) == 1, (device["path"], tables)
        assert tables["runtime-go"].endswith(
            f" {DEVICE} {DEVICE} 4096 4096 "
            f"{device['verity']['data_blocks']} "
            f"{device['verity']['hash_start_block']} sha256 "
            f"{device['root_hash']} -"
        )
        check = veritysetup_verify(Path(device["path"]), table=tables["kata-types"])
        assert check.returncode == 0, (device["path"], check.stderr)
