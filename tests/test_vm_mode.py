"""VM-mode snapshots: a container rootfs over a committed chain gets one fsmeta mount with a
device per layer blob and every device's dm-verity data; the kernel mounts it and shows what
the host overlay mounts show; mounts never change; unused fsmetas are cleaned up."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from snapshotter.snapshots import Snapshotter
from snapshotter.vm_mode import DEVICES_OPTION, VM_MODE_LABEL
from tests.helpers import require_root, require_tool, unmount_below
from tests.test_erofs_merge import mounted_fsmeta
from tests.treecompare import diff_views, tree_view


@pytest.fixture(autouse=True)
def _unmount_layers(tmp_path: Path):
    """The snapshotter mounts parents' layers for overlays; undo that after each test."""
    yield
    unmount_below(tmp_path)


def _write_layer(fs: Path, n: int) -> None:
    """What containerd's applier leaves in an upper: files, 0:0 whiteouts, opaque dirs."""
    (fs / "etc").mkdir(exist_ok=True)
    (fs / "etc" / f"from-layer-{n}").write_text(f"layer {n}\n")
    (fs / "shared").write_text(f"top is {n}\n")
    if n == 1:
        (fs / "var").mkdir()
        (fs / "var" / "old").write_text("old")
        (fs / "gone").write_text("gone")
    if n == 2:
        os.mknod(fs / "gone", stat.S_IFCHR | 0o600, os.makedev(0, 0))
        (fs / "var").mkdir()
        os.setxattr(fs / "var", "trusted.overlay.opaque", b"y")
        (fs / "var" / "new").write_text("new")


def _chain(sn: Snapshotter, layers: int) -> str:
    parent = ""
    for n in range(1, layers + 1):
        key = f"default/{n}/extract-{n}"
        mounts = sn.prepare(key, parent)
        fs = Path(mounts[0].source) if mounts[0].type == "bind" else next(
            Path(o.split("=", 1)[1]) for o in mounts[0].options if o.startswith("upperdir="))
        _write_layer(fs, n)
        name = f"default/{n}/sha256:layer{n}"
        sn.commit(name, key)
        parent = name
    return parent


def _devices(mounts) -> list[dict]:
    (mount,) = mounts
    (payload,) = [o for o in mount.options if o.startswith(DEVICES_OPTION)]
    return json.loads(base64.b64decode(payload[len(DEVICES_OPTION):]))


def test_vm_mode_rootfs_is_one_fsmeta_with_verified_devices(tmp_path: Path) -> None:
    require_root()
    veritysetup = require_tool("veritysetup")
    sn = Snapshotter(tmp_path / "root")
    top = _chain(sn, 3)
    mounts = sn.prepare("default/9/container", top, {VM_MODE_LABEL: "true"})
    (mount,) = mounts
    assert mount.type == "erofs" and mount.source.endswith("image.fsmeta")
    devices = _devices(mounts)
    assert [d["role"] for d in devices] == ["fsmeta", "layer", "layer", "layer"]
    blobs = [d["path"] for d in devices[1:]]
    assert [o for o in mount.options if o.startswith("device=")] == [f"device={b}" for b in blobs]
    for d in devices:  # every device the guest gets is verifiable by its root hash
        proc = subprocess.run([veritysetup, "verify", d["path"], d["path"], d["root_hash"],
                               f"--hash-offset={d['verity']['hash_offset']}"], capture_output=True)
        assert proc.returncode == 0, d
    assert sn.mounts("default/9/container") == mounts  # Mounts never differ from Prepare's

    host_view = sn.view("default/10/host-view", top)  # the host path: overlay of loop mounts
    host_mnt = tmp_path / "host"
    host_mnt.mkdir()
    subprocess.run(["mount", "-t", host_view[0].type, "-o", ",".join(host_view[0].options),
                    host_view[0].source, str(host_mnt)], check=True)
    try:
        want = tree_view(host_mnt)
    finally:
        subprocess.run(["umount", str(host_mnt)], check=True)
    with mounted_fsmeta(Path(mount.source), [Path(b) for b in blobs]) as mnt:
        got = tree_view(mnt)
    assert diff_views(got, want) == []
    assert (got["shared"].content is not None) and "gone" not in got and "var/old" not in got


def test_chain_fsmeta_is_built_once_and_cleaned_when_unused(tmp_path: Path) -> None:
    require_root()
    sn = Snapshotter(tmp_path / "root", vm_mode=True)
    top = _chain(sn, 2)
    a = sn.prepare("default/5/container-a", top)
    fsmeta = Path(a[0].source)
    before = fsmeta.stat().st_mtime_ns
    b = sn.view("default/6/container-b", top)
    assert Path(b[0].source) == fsmeta and fsmeta.stat().st_mtime_ns == before
    assert sn.stat("default/5/container-a").labels[VM_MODE_LABEL] == "true"
    unpack = sn.prepare("default/7/extract-7", top)  # unpacks never get VM mounts
    assert unpack[0].type == "overlay"
    sn.remove("default/5/container-a")
    sn.cleanup()
    assert fsmeta.exists(), "still used by container-b"
    sn.remove("default/6/container-b")
    sn.cleanup()
    assert not fsmeta.parent.exists()


@pytest.mark.parametrize("label", ["false"])
def test_label_overrides_the_configured_default(tmp_path: Path, label: str) -> None:
    require_root()
    sn = Snapshotter(tmp_path / "root", vm_mode=True)
    top = _chain(sn, 1)
    mounts = sn.prepare("default/3/c", top, {VM_MODE_LABEL: label})
    assert mounts[0].type != "erofs" or "device=" not in ",".join(mounts[0].options)


def test_signing_key_publishes_a_manifest_the_devices_match(tmp_path: Path) -> None:
    require_root()
    from shim_integration.manifest import check_devices, generate_key, load_public_key, verify

    generate_key(tmp_path / "key")
    sn = Snapshotter(tmp_path / "root", vm_mode=True, signing_key=tmp_path / "key")
    top = _chain(sn, 2)
    mounts = sn.prepare("default/3/c", top)
    devices = _devices(mounts)
    fsmeta_dir = Path(mounts[0].source).parent
    signed = verify((fsmeta_dir / "manifest.json").read_bytes(),
                    (fsmeta_dir / "manifest.sig").read_bytes(),
                    [load_public_key((tmp_path / "key.pub").read_bytes())])
    check_devices(signed, [d["root_hash"] for d in devices])
    assert signed.manifest["fsmeta"]["tags"] == [d["tag"] for d in devices[1:]]
