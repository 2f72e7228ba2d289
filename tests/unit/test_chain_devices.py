"""The VM device list's codec (snapshotter.fsmeta.devices): fsmeta.json round-trips byte for
byte, anything else is refused in one line, and the mount option decodes what it encodes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from snapshotter.fsmeta.devices import (
    MAX_LAYERS,
    ChainDescription,
    DeviceListError,
    decode_description_option,
    device_list_roots,
    encode_description_option,
    read_description,
)
from snapshotter.verity import VerityInfo


def _verity(root: str, salt: str = "ab" * 32, data_blocks: int = 3) -> dict:
    return VerityInfo(
        root,
        salt,
        "sha256",
        4096,
        4096,
        data_blocks,
        data_blocks * 4096,
        True,
        "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0",
    ).to_json()


def _description(directory: Path, layers: int = 2) -> dict:
    """What vm_mode writes for a chain (every key, a signed manifest beside it)."""
    return {
        "fsmeta": {
            "role": "fsmeta",
            "path": str(directory / "image.fsmeta"),
            "size": 8192,
            "digest": "sha256:" + "f0" * 32,
            "root_hash": "ee" * 32,
            "verity": _verity("ee" * 32, data_blocks=2),
        },
        "layers": [
            {
                "role": "layer",
                "path": f"/snapshots/{i}/layer.erofs",
                "size": 12288,
                "device": i,
                "tag": f"{i:02x}" * 32,
                "blocks": 3,
                "uniaddr": 2 + 3 * i,
                "digest": f"sha256:{i:02x}" + "00" * 31,
                "diff_id": f"sha256:{i:064x}",
                "root_hash": f"{i:02x}" * 32,
                "verity": _verity(f"{i:02x}" * 32),
            }
            for i in range(1, layers + 1)
        ],
        "manifest": {
            "path": str(directory / "manifest.json"),
            "signature": str(directory / "manifest.sig"),
            "key_id": "sha256:" + "1" * 64,
        },
    }


def test_description_round_trips_byte_for_byte(tmp_path: Path) -> None:
    data = _description(tmp_path)
    raw = json.dumps(data, indent=2, sort_keys=True).encode()  # how the service writes it
    chain = ChainDescription.from_bytes(raw)
    assert chain.to_bytes() == raw
    assert [d.role for d in chain.devices()] == ["fsmeta", "layer", "layer"]
    assert [d.device for d in chain.layers] == [1, 2]
    assert chain.layers[1].verity == VerityInfo.from_json(data["layers"][1]["verity"])
    assert chain.fsmeta.device is None and chain.manifest == data["manifest"]
    # an unsigned chain has no manifest key, and a layer without the optional facts parses
    del data["manifest"]
    for key in ("size", "tag", "blocks", "uniaddr", "digest", "diff_id", "device"):
        del data["layers"][0][key]
    assert ChainDescription.from_json(data).to_json() == data


def _broken(tmp_path: Path, change) -> dict:
    data = _description(tmp_path)
    change(data)
    return data


BAD = {
    "not an object": (lambda d: d.clear(), "not a chain description"),
    "no fsmeta": (lambda d: d.pop("fsmeta"), "fsmeta is not a JSON object"),
    "fsmeta as a layer": (lambda d: d["fsmeta"].update(role="layer"), "not 'fsmeta'"),
    "unknown role": (lambda d: d["layers"][0].update(role="disk"), "role 'disk' is none of"),
    "layer out of order": (lambda d: d["layers"].reverse(), "not layer device 1"),
    "negative size": (lambda d: d["layers"][1].update(size=-1), "layer 2: size -1 is negative"),
    "size as text": (lambda d: d["fsmeta"].update(size="8192"), "size '8192' is not a JSON int"),
    "count as bool": (lambda d: d["layers"][0].update(blocks=True), "is not a JSON int"),
    "no path": (lambda d: d["layers"][0].pop("path"), "layer 1: no path"),
    "empty path": (lambda d: d["layers"][0].update(path=""), "layer 1: empty path"),
    "no verity": (lambda d: d["layers"][0].pop("verity"), "no verity description"),
    "bad verity": (
        lambda d: d["layers"][0]["verity"].pop("hash_offset"),
        "layer 1: not a verity description",
    ),
    "root not the tree's": (
        lambda d: d["layers"][0].update(root_hash="ff" * 32),
        "is not its tree's root",
    ),
    "manifest not strings": (lambda d: d.update(manifest={"path": 1}), "manifest: not an"),
}


@pytest.mark.parametrize("case", BAD)
def test_description_refuses_what_the_service_does_not_write(tmp_path: Path, case: str) -> None:
    change, message = BAD[case]
    with pytest.raises(DeviceListError, match=message) as exc:
        ChainDescription.from_json(_broken(tmp_path, change))
    assert "\n" not in str(exc.value)


def test_description_refuses_more_layers_than_erofs_addresses() -> None:
    with pytest.raises(DeviceListError, match=f"at most {MAX_LAYERS} devices"):
        ChainDescription.from_json({"fsmeta": {}, "layers": [{}] * (MAX_LAYERS + 1)})
    with pytest.raises(DeviceListError, match="not JSON"):
        ChainDescription.from_bytes(b'{"fsmeta": ')


def test_mount_option_decodes_what_it_encodes(tmp_path: Path) -> None:
    path = tmp_path / "fsmeta.json"
    option = encode_description_option(path)
    assert decode_description_option(["ro", option, "upperdir=/u"]) == str(path)
    for options, count in ((["ro"], 0), ([option, option], 2)):
        with pytest.raises(DeviceListError, match=f"carries {count} erofs-passthrough"):
            decode_description_option(options)


def test_read_description_checks_it_describes_that_fsmeta(tmp_path: Path) -> None:
    data = _description(tmp_path)
    (tmp_path / "fsmeta.json").write_text(json.dumps(data))
    chain = read_description(tmp_path / "image.fsmeta", tmp_path / "fsmeta.json")
    assert chain.fsmeta.path == str(tmp_path / "image.fsmeta")
    data["fsmeta"]["path"] = "/elsewhere/image.fsmeta"
    (tmp_path / "fsmeta.json").write_text(json.dumps(data))
    with pytest.raises(DeviceListError, match=r"describes /elsewhere/image\.fsmeta, not"):
        read_description(tmp_path / "image.fsmeta", tmp_path / "fsmeta.json")
    (tmp_path / "fsmeta.json").write_text("[]")
    with pytest.raises(DeviceListError, match=r"fsmeta\.json: not a chain description"):
        read_description(tmp_path / "image.fsmeta", tmp_path / "fsmeta.json")


def test_device_list_roots_takes_a_description_or_a_partial_list(tmp_path: Path) -> None:
    data = _description(tmp_path)
    roots = ["ee" * 32, "01" * 32, "02" * 32]
    assert device_list_roots(data) == (roots, [d["diff_id"] for d in data["layers"]])
    assert device_list_roots([{"root_hash": roots[0]}, {"verity": {"root_hash": roots[1]}}]) == (
        roots[:2],
        [""],
    )
    with pytest.raises(DeviceListError, match="device 1 has no root_hash"):
        device_list_roots([{"root_hash": roots[0]}, {}])
    with pytest.raises(DeviceListError, match=r"neither a chain's fsmeta\.json nor a list"):
        device_list_roots({"layers": []})
