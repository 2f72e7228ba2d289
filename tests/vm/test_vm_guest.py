"""A real guest (Debian's 6.1 cloud kernel under QEMU TCG, booted from a root image our own
converter built and dm-verity protects) gets EROFS blobs hotplugged over virtio-blk and
vhost-user-blk; its agent opens dm-verity with the root hash, mounts, and reads.

One guest is booted for the session (tests/support/guest_fixtures.py); every test leaves it as it
found it (the autouse fixture checks: nothing mounted, no dm device, no hotplugged disk, no node
left in QEMU).
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest

from passthrough.agent_client import AgentClient
from passthrough.agent_protocol import ARG_ROOT_TABLE
from passthrough.attach import TRANSPORTS, Attacher, Attachment
from passthrough.errors import AgentFailure
from passthrough.guest_image import GuestImage
from passthrough.guest_volume import find_disk, open_verity
from passthrough.vm import Vm, VmConfig
from tests.support.guest_fixtures import assert_clean

pytestmark = [pytest.mark.qemu, pytest.mark.root, pytest.mark.slow]

CLI = [sys.executable, "-m", "shim_integration.cli"]

# The layer every test uses: names -> bytes (a str value is a symlink target).
_rng = hashlib.sha256(b"erofs-passthrough guest test").digest()


def _pseudo_random(n: int, seed: bytes) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(seed + counter.to_bytes(8, "little")).digest()
        counter += 1
    return bytes(out[:n])


LAYER: dict[str, bytes | str] = {
    "etc/hello.txt": b"hello from the host\n",
    "usr/share/big.bin": _pseudo_random(300_000, b"big"),
    "usr/share/victim.bin": _pseudo_random(65_536, b"victim"),
    "deep/a/b/c/d/leaf": _pseudo_random(5_000, b"leaf"),
    "empty": b"",
    "link-to-hello": "etc/hello.txt",
}


# --- the layer: built on the host by our converter ------------------------------------------


def _layer_tar(entries: dict[str, bytes | str]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs = sorted(
            {str(Path(n).parents[i]) for n in entries for i in range(len(Path(n).parents) - 1)}
        )
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1700000000
            tar.addfile(info)
        for name, value in sorted(entries.items()):
            info = tarfile.TarInfo(name)
            info.mtime = 1700000000
            if isinstance(value, str):
                info.type, info.linkname = tarfile.SYMTYPE, value
                tar.addfile(info)
            else:
                info.size, info.mode = len(value), 0o644
                tar.addfile(info, io.BytesIO(value))
    return buf.getvalue()


def _convert(tar: Path, out: Path) -> dict[str, Any]:
    proc = subprocess.run(
        [*CLI, "convert", str(tar), str(out), "--verity", "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["verity"]


@pytest.fixture(scope="module")
def layer(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    d = tmp_path_factory.mktemp("layer")
    (d / "layer.tar").write_bytes(_layer_tar(LAYER))
    blob = d / "layer.erofs"
    return blob, _convert(d / "layer.tar", blob)


def expected_entries(entries: dict[str, bytes | str]) -> dict[str, Any]:
    out = {}
    for name, value in entries.items():
        if isinstance(value, str):
            out[name] = {"target": value}
        else:
            out[name] = {"sha256": hashlib.sha256(value).hexdigest(), "size": len(value)}
    return out


def observed(tree: dict[str, Any], names: list[str]) -> dict[str, Any]:
    keep = ("sha256", "size", "target", "errno")
    return {n: {k: v for k, v in tree[n].items() if k in keep} for n in names if n in tree}


def _mount_blob(
    agent: AgentClient,
    attacher: Attacher,
    blob: Path,
    verity: dict[str, Any],
    transport: str,
    name: str,
) -> tuple[Attachment, str]:
    att = attacher.attach(blob, transport)
    disk = find_disk(agent, att)
    mapper = open_verity(agent, name, disk["path"], verity)
    return att, agent.mount(mapper)


# --- tests ---------------------------------------------------------------------------------


def test_guest_runs_from_our_verified_root(guest_image: GuestImage, agent: AgentClient) -> None:
    pong = agent.ping()
    assert pong["pid"] == 1 and pong["kernel"] == guest_image.kernel_release
    mounts = agent.run("cat", "/proc/mounts")["stdout"].splitlines()
    assert mounts and any(line.startswith("/dev/mapper/root / erofs ro") for line in mounts)
    table = agent.run("dmsetup", "table", "root")["stdout"]
    assert f" {guest_image.root_verity['root_hash']} " in table
    assert agent.verity_status("root")["corrupted"] is False


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_layer_over_transport_reads_what_the_host_wrote(
    transport: str,
    vm: Vm,
    agent: AgentClient,
    attacher: Attacher,
    layer: tuple[Path, dict[str, Any]],
) -> None:
    blob, verity = layer
    start = time.monotonic()
    att, mnt = _mount_blob(agent, attacher, blob, verity, transport, "layer")
    ready = time.monotonic() - start
    tree = agent.hash_tree(mnt)
    assert observed(tree, list(LAYER)) == expected_entries(LAYER)
    dirs = {"etc", "usr", "usr/share", "deep", "deep/a", "deep/a/b", "deep/a/b/c", "deep/a/b/c/d"}
    assert set(tree) == set(LAYER) | dirs
    assert agent.read_file(f"{mnt}/etc/hello.txt") == LAYER["etc/hello.txt"]
    assert agent.verity_status("layer")["corrupted"] is False
    print(f"{transport}: attach -> verity open -> mounted in {ready:.3f}s")

    # detach (the autouse fixture checks guest and QEMU afterwards too)
    agent.teardown()
    disk = find_disk(agent, att)
    attacher.detach(att.device_id)
    assert disk["name"] not in {d["name"] for d in agent.block_devices()}
    assert_clean(vm, agent, attacher)


def _flip_byte_in(blob: Path, content: bytes, out: Path) -> int:
    data = bytearray(blob.read_bytes())
    at = data.find(content[4096:8192])  # the file's second block, wherever the writer put it
    assert at > 0 and data.find(content[4096:8192], at + 1) == -1
    data[at + 100] ^= 0x01
    out.write_bytes(bytes(data))
    return at // 4096


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_flipped_data_byte_fails_that_file_only(
    transport: str,
    agent: AgentClient,
    attacher: Attacher,
    layer: tuple[Path, dict[str, Any]],
    tmp_path: Path,
) -> None:
    blob, verity = layer
    bad = tmp_path / "tampered.erofs"
    block = _flip_byte_in(blob, LAYER["usr/share/victim.bin"], bad)  # type: ignore[arg-type]
    _att, mnt = _mount_blob(agent, attacher, bad, verity, transport, "tampered")
    with pytest.raises(AgentFailure) as err:
        agent.read_file(f"{mnt}/usr/share/victim.bin")
    assert err.value.errno == errno.EIO
    tree = agent.hash_tree(mnt)
    assert tree["usr/share/victim.bin"]["errno"] == errno.EIO
    others = [n for n in LAYER if n != "usr/share/victim.bin"]
    assert observed(tree, others) == expected_entries({n: LAYER[n] for n in others})
    assert agent.verity_status("tampered")["corrupted"] is True
    dmesg = agent.run("dmesg")["stdout"]
    assert f"data block {block} is corrupted" in dmesg


def test_wrong_root_hash_mounts_nothing(
    agent: AgentClient, attacher: Attacher, layer: tuple[Path, dict[str, Any]]
) -> None:
    blob, verity = layer
    root = verity["root_hash"]
    wrong = dict(verity, root_hash=root[:-1] + ("0" if root[-1] != "0" else "1"))
    att = attacher.attach(blob, "virtio-blk")
    disk = find_disk(agent, att)
    mapper = open_verity(agent, "wrong", disk["path"], wrong)
    with pytest.raises(AgentFailure) as err:
        agent.mount(mapper)
    assert err.value.errno in (errno.EIO, errno.EINVAL)
    assert agent.call("mounts")["mounts"] == []
    assert "/dev/mapper/wrong" not in agent.run("cat", "/proc/mounts")["stdout"]
    with pytest.raises(AgentFailure) as raw:
        agent.read_file(mapper, length=4096)
    assert raw.value.errno == errno.EIO


def test_multi_device_erofs_behind_verity(
    agent: AgentClient, attacher: Attacher, tmp_path: Path
) -> None:
    """A metadata image with its data in a second device (mkfs.erofs --blobdev: chunk-based
    inodes addressing device 1), both behind dm-verity, over different transports, mounted
    with device=."""
    src = tmp_path / "src"
    for name, value in LAYER.items():
        path = src / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(value, str):
            path.symlink_to(value)
        else:
            path.write_bytes(value)
    meta, blob = tmp_path / "meta.erofs", tmp_path / "blob.img"
    subprocess.run(
        ["mkfs.erofs", "--quiet", f"--blobdev={blob}", "--chunksize=4096", str(meta), str(src)],
        check=True,
        capture_output=True,
    )
    verity = {}
    for path in (meta, blob):
        proc = subprocess.run(
            [*CLI, "verity", "format", str(path), "--json"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        verity[path] = json.loads(proc.stdout)
        verity[path] = verity[path].get("verity", verity[path])

    meta_att = attacher.attach(meta, "virtio-blk")
    blob_att = attacher.attach(blob, "vhost-user-blk")
    blob_dm = open_verity(agent, "mdblob", find_disk(agent, blob_att)["path"], verity[blob])
    meta_dm = open_verity(agent, "mdmeta", find_disk(agent, meta_att)["path"], verity[meta])
    with pytest.raises(AgentFailure):  # the data device is required
        agent.mount(meta_dm, target="/run/ep/mnt/md-missing")
    mnt = agent.mount(meta_dm, options=[f"device={blob_dm}"])
    assert observed(agent.hash_tree(mnt), list(LAYER)) == expected_entries(LAYER)


def test_merged_fsmeta_over_verified_layer_blobs(
    agent: AgentClient, attacher: Attacher, tmp_path: Path
) -> None:
    """Our converter's layer blobs and our merge's fsmeta (device table: blob 1 = lowest),
    each behind its own dm-verity device, mounted with device= in table order: the guest sees
    the merged image with the upper layer's files and whiteouts applied."""
    lower: dict[str, bytes | str] = {**LAYER, "etc/a": b"base\n", "etc/b": b"to be deleted\n"}
    upper: dict[str, bytes | str] = {
        "etc/a": b"changed\n",
        "etc/c": b"new\n",
        "etc/.wh.b": b"",
        "usr/share/big.bin": _pseudo_random(70_000, b"upper"),
    }
    blobs, verity = [], {}
    for name, entries in (("lower", lower), ("upper", upper)):
        (tmp_path / f"{name}.tar").write_bytes(_layer_tar(entries))
        blob = tmp_path / f"{name}.erofs"
        verity[blob] = _convert(tmp_path / f"{name}.tar", blob)
        blobs.append(blob)
    meta = tmp_path / "fsmeta.erofs"
    proc = subprocess.run(
        [*CLI, "merge", str(meta), *map(str, blobs), "--verity", "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    merged = json.loads(proc.stdout)
    assert [d["path"] for d in merged["devices"]] == [str(b) for b in blobs]
    verity[meta] = merged["verity"]

    mappers = []
    for i, (path, transport) in enumerate(
        zip([meta, *blobs], ["virtio-blk", "vhost-user-blk", "virtio-blk"], strict=True)
    ):
        att = attacher.attach(path, transport)
        mappers.append(open_verity(agent, f"fs{i}", find_disk(agent, att)["path"], verity[path]))
    mnt = agent.mount(mappers[0], options=[f"device={m}" for m in mappers[1:]])
    view = {k: v for k, v in lower.items() if k != "etc/b"}
    view.update({k: v for k, v in upper.items() if ".wh." not in k})
    tree = agent.hash_tree(mnt)
    assert observed(tree, list(view)) == expected_entries(view)
    assert "etc/b" not in tree and not [n for n in tree if ".wh." in n]
    for name in mappers:
        assert agent.verity_status(name.rsplit("/", 1)[-1])["corrupted"] is False


def test_agent_survives_reconnects_and_bad_requests(vm: Vm, agent: AgentClient) -> None:
    with pytest.raises(AgentFailure, match="unknown op"):
        agent.call("no-such-op")
    with pytest.raises(AgentFailure) as err:
        agent.read_file("/no/such/file")
    assert err.value.errno == errno.ENOENT
    with pytest.raises(AgentFailure) as err:
        agent.mount("/dev/no-such-disk", target="/run/ep/mnt/x")
    assert err.value.errno == errno.ENOENT
    # The port is single-client: a second client waits; after the first closes, the agent
    # reopens the port and serves the new one.
    agent.close()
    for _ in range(2):
        with AgentClient(vm.agent_path, timeout=30) as again:
            assert again.ping()["pid"] == 1
    agent.reconnect()
    assert agent.ping()["pid"] == 1


def test_cli_attach_detach_round_trip(
    vm: Vm,
    agent: AgentClient,
    attacher: Attacher,
    layer: tuple[Path, dict[str, Any]],
    tmp_path: Path,
) -> None:
    blob, verity = layer
    copy = tmp_path / "copy.erofs"
    shutil.copyfile(blob, copy)
    attacher.close()  # the storage daemon's QMP serves one client: let the CLI have it
    qmp = str(vm.qmp_path)
    out = subprocess.run(
        [
            *CLI,
            "attach",
            "--qmp",
            qmp,
            "--json",
            "--transport",
            "vhost-user-blk",
            str(blob),
            str(copy),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    atts = json.loads(out.stdout)["attached"]
    assert len({a["root_port"] for a in atts}) == 2
    for i, a in enumerate(atts):
        disk = agent.wait_block(pci=a["pci_slot"])
        open_verity(agent, f"cli{i}", disk["path"], verity)
    agent.teardown()
    # all or nothing: one good file and one missing file attach nothing
    half = subprocess.run(
        [*CLI, "attach", "--qmp", qmp, str(tmp_path / "gone"), str(blob)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert half.returncode == 1 and "No such file" in half.stderr
    det = subprocess.run(
        [*CLI, "detach", "--qmp", qmp, "--json", atts[0]["device_id"], str(copy)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert det.returncode == 0, det.stderr
    assert {a["device_id"] for a in json.loads(det.stdout)["detached"]} == {
        a["device_id"] for a in atts
    }
    again = subprocess.run(
        [*CLI, "detach", "--qmp", qmp, atts[0]["device_id"]],
        capture_output=True,
        text=True,
        check=False,
    )
    assert again.returncode == 1 and "not attached" in again.stderr


def test_guest_with_a_wrong_root_hash_does_not_boot(guest_image: GuestImage) -> None:
    """The initramfs refuses a root image that does not match the command line's root hash:
    PID 1 exits, the kernel panics, QEMU stops (-no-reboot) and the launcher says why."""
    from passthrough.errors import VmFailure

    root = guest_image.root_verity["root_hash"]
    wrong = root[:-1] + ("0" if root[-1] != "0" else "1")
    args = [
        arg.replace(f",{root},", f",{wrong},") if arg.startswith(f"{ARG_ROOT_TABLE}=") else arg
        for arg in guest_image.kernel_args
    ]
    assert args != list(guest_image.kernel_args)
    config = VmConfig.for_guest(guest_image, root_ports=1, storage_daemon=False)
    config.kernel_args = args
    with Vm(config) as vm, pytest.raises(VmFailure) as err:
        vm.wait_agent(timeout=60)
    assert "ep-init: FAILED: mount the EROFS root" in str(err.value)
    assert not vm.alive


def test_cli_attach_is_all_or_nothing(
    vm: Vm, agent: AgentClient, attacher: Attacher, tmp_path: Path
) -> None:
    """Two files, one free root port: the second attach fails (pool exhausted) and the CLI
    detaches the first again; devices attached before the call stay."""
    files = []
    for i in range(9):
        f = tmp_path / f"f{i}.img"
        f.write_bytes(bytes([i]) * 4096)
        files.append(f)
    held = [attacher.attach(f, "virtio-blk") for f in files[:7]]  # 8 ports: one left
    attacher.close()
    proc = subprocess.run(
        [*CLI, "attach", "--qmp", str(vm.qmp_path), str(files[0]), str(files[7]), str(files[8])],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1 and "no free pcie-root-port" in proc.stderr
    assert "detached again: ep-b-" in proc.stderr
    assert {a.device_id for a in attacher.attached()} == {a.device_id for a in held}
    for att in held:
        agent.wait_block(serial=att.serial)
    assert len(agent.block_devices()) == 1 + len(held)
