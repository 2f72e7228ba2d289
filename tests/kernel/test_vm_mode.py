"""VM-mode snapshots: a container rootfs over a committed chain gets one mount of its fsmeta
naming the chain's description (every device with its dm-verity data); the kernel mounts the
fsmeta with its devices and shows what the host overlay mounts show; mount.fuse runs our mount
program with it exactly as containerd does, for runc; the options stay under a page for 500
layers; mounts never change; unused fsmetas are cleaned up."""

from __future__ import annotations

import functools
import os
import subprocess
import time
from pathlib import Path

import pytest

from snapshotter import fsmount
from snapshotter.fsmeta.devices import (
    MOUNT_PROGRAM,
    MOUNT_TYPE,
    ChainDevice,
    read_mounted_description,
)
from snapshotter.fsmeta.merge import LayerBlob, merge_layers
from snapshotter.service import mount_helper, vm_mode
from snapshotter.service.snapshots import Snapshotter
from snapshotter.service.vm_mode import VM_MODE_LABEL, fsmeta_verity
from tests.support.helpers import mounted_fsmeta, require_root, require_tool, unmount_below
from tests.support.treecompare import diff_views, tree_view
from tests.support.vm_mode import commit_chain, mount_program_env


@pytest.fixture(autouse=True)
def _unmount_layers(tmp_path: Path):
    """The snapshotter mounts parents' layers for overlays; undo that after each test."""
    yield
    unmount_below(tmp_path)


def _devices(mounts) -> list[ChainDevice]:
    (mount,) = mounts
    return read_mounted_description(mount.source, mount.options).devices()


def containerd_mount(mount, target: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """What containerd 1.6-2.1 run for a `fuse.` mount (mount/mount_linux.go
    mountWithHelper): `mount.fuse SOURCE TARGET -o OPT ... -t TYPE-without-fuse.`."""
    assert mount.type.startswith("fuse.")
    args = ["mount.fuse", mount.source, str(target)]
    for option in mount.options:
        args += ["-o", option]
    args += ["-t", mount.type.removeprefix("fuse.")]
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=60)


def _mounts_of(*paths: object) -> list[str]:
    """Lines of /proc/self/mounts whose source or target holds any of PATHS."""
    with open("/proc/self/mounts") as f:
        return [
            line for line in f if any(str(p) in field for p in paths for field in line.split()[:2])
        ]


def _loop_backing_files() -> list[str]:
    return subprocess.run(
        ["losetup", "--list", "--noheadings", "-O", "BACK-FILE"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()


def _eventually(check, timeout: float = 5.0) -> bool:
    """CHECK() within TIMEOUT (an autoclear loop device is released just after the unmount)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _host_view(sn: Snapshotter, key: str, top: str, tmp_path: Path) -> dict:
    """The tree the host path (overlay of per-layer mounts) shows for TOP."""
    host_view = sn.view(key, top, {VM_MODE_LABEL: "false"})
    host_mnt = tmp_path / "host"
    host_mnt.mkdir()
    subprocess.run(
        [
            "mount",
            "-t",
            host_view[0].type,
            "-o",
            ",".join(host_view[0].options),
            host_view[0].source,
            str(host_mnt),
        ],
        check=True,
    )
    try:
        return tree_view(host_mnt)
    finally:
        subprocess.run(["umount", str(host_mnt)], check=True)


def test_vm_mode_rootfs_is_one_fsmeta_with_verified_devices(tmp_path: Path) -> None:
    require_root()
    veritysetup = require_tool("veritysetup")
    sn = Snapshotter(tmp_path / "root")
    top = commit_chain(sn, 3)
    mounts = sn.prepare("default/9/container", top, {VM_MODE_LABEL: "true"})
    (mount,) = mounts
    assert mount.type == MOUNT_TYPE and mount.source.endswith("image.fsmeta")
    devices = _devices(mounts)
    assert [d.role for d in devices] == ["fsmeta", "layer", "layer", "layer"]
    blobs = [d.path for d in devices[1:]]
    assert not [o for o in mount.options if o.startswith("device=")]  # by reference only
    for d in devices:  # every device the guest gets is verifiable by its root hash
        proc = subprocess.run(
            [
                veritysetup,
                "verify",
                d.path,
                d.path,
                d.root_hash,
                f"--hash-offset={d.verity.hash_offset}",
            ],
            capture_output=True,
        )
        assert proc.returncode == 0, d
    assert sn.mounts("default/9/container") == mounts  # Mounts never differ from Prepare's

    want = _host_view(sn, "default/10/host-view", top, tmp_path)
    with mounted_fsmeta(Path(mount.source), [Path(b) for b in blobs]) as mnt:
        got = tree_view(mnt)
    assert diff_views(got, want) == []
    assert (got["shared"].content is not None) and "gone" not in got and "var/old" not in got


def test_chain_fsmeta_is_built_once_and_cleaned_when_unused(tmp_path: Path) -> None:
    require_root()
    sn = Snapshotter(tmp_path / "root", vm_mode=True)
    top = commit_chain(sn, 2)
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


def test_chain_continues_from_its_published_parent_chain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fsmeta of a chain extending a published one is merged from that fsmeta (only the
    new layer read) and is byte for byte the fsmeta of a merge of every layer."""
    require_root()
    sn = Snapshotter(tmp_path / "root", vm_mode=True)
    top = commit_chain(sn, 3)
    lower = sn.prepare("default/5/container-a", "default/2/sha256:layer2")
    said: list[str] = []  # the real merge, its steps observed
    monkeypatch.setattr(
        vm_mode,
        "merge_layers",
        functools.partial(vm_mode.merge_layers, progress=said.append),
    )
    upper = sn.prepare("default/6/container-b", top)
    assert f"layers 1-2 from {lower[0].source}" in said, said
    assert not any(step.startswith(("layer 1/", "layer 2/")) for step in said)
    devices = _devices(upper)
    layers = [LayerBlob(Path(d.path), tag=d.tag) for d in devices if d.role == "layer"]
    scratch = tmp_path / "scratch.fsmeta"
    merge_layers(layers, scratch, verity=fsmeta_verity([d.verity.salt for d in devices[1:]]))
    assert Path(upper[0].source).read_bytes() == scratch.read_bytes()


@pytest.mark.parametrize("label", ["false"])
def test_label_overrides_the_configured_default(tmp_path: Path, label: str) -> None:
    require_root()
    sn = Snapshotter(tmp_path / "root", vm_mode=True)
    top = commit_chain(sn, 1)
    mounts = sn.prepare("default/3/c", top, {VM_MODE_LABEL: label})
    assert mounts[0].type == "overlay"


def test_signing_key_publishes_a_manifest_the_devices_match(tmp_path: Path) -> None:
    require_root()
    from snapshotter.manifest import check_devices, generate_key, load_public_key, verify

    generate_key(tmp_path / "key")
    sn = Snapshotter(tmp_path / "root", vm_mode=True, signing_key=tmp_path / "key")
    top = commit_chain(sn, 2)
    mounts = sn.prepare("default/3/c", top)
    devices = _devices(mounts)
    fsmeta_dir = Path(mounts[0].source).parent
    signed = verify(
        (fsmeta_dir / "manifest.json").read_bytes(),
        (fsmeta_dir / "manifest.sig").read_bytes(),
        [load_public_key((tmp_path / "key.pub").read_bytes())],
    )
    check_devices(signed, [d.root_hash for d in devices])
    assert signed.manifest["fsmeta"]["tags"] == [d.tag for d in devices[1:]]


def test_mount_fuse_runs_the_mount_program_for_runc(tmp_path: Path) -> None:
    """containerd's invocation of a `fuse.` mount mounts the rootfs: the image's tree, writes
    land in the snapshot's upper, and unmounting the one mount at the target releases all."""
    require_root()
    env = mount_program_env(tmp_path)
    sn = Snapshotter(tmp_path / "root", vm_mode=True)
    top = commit_chain(sn, 3)
    want = _host_view(sn, "default/4/host-view", top, tmp_path)
    mounts = sn.prepare("default/5/container", top)
    (mount,) = mounts
    upper = next(Path(o.split("=", 1)[1]) for o in mount.options if o.startswith("upperdir="))
    target = tmp_path / "rootfs"
    target.mkdir()
    proc = containerd_mount(mount, target, env)
    assert proc.returncode == 0, proc.stderr
    try:
        # (an overlay's root directory is its upper's: its own mtime, as on runc's overlayfs)
        got = tree_view(target)
        assert got["."].mode == want["."].mode
        assert (
            diff_views(
                {k: v for k, v in got.items() if k != "."},
                {k: v for k, v in want.items() if k != "."},
            )
            == []
        )
        (target / "etc" / "written").write_text("by the container")
        assert (upper / "etc" / "written").read_text() == "by the container"
        assert not _mounts_of("erofs-passthrough-lower-")  # the lower is held by the overlay
    finally:
        subprocess.run(["umount", str(target)], check=True)
    assert not _mounts_of(target, mount.source)
    assert not list(Path(os.environ.get("TMPDIR", "/tmp")).glob("erofs-passthrough-lower-*"))

    view = sn.view("default/6/view", top)  # a view: the image itself, read-only
    assert "ro" in view[0].options and not any(o.startswith("upperdir=") for o in view[0].options)
    proc = containerd_mount(view[0], target, env)
    assert proc.returncode == 0, proc.stderr
    try:
        assert diff_views(tree_view(target), want) == []
        with pytest.raises(OSError, match="Read-only"):
            (target / "new").write_text("x")
    finally:
        subprocess.run(["umount", str(target)], check=True)


def test_mount_program_over_loop_devices_releases_them(tmp_path: Path) -> None:
    """Where the kernel has no file-backed EROFS, every device is an autoclear loop device:
    the same rootfs, and none of them left once the rootfs is unmounted."""
    require_root()
    sn = Snapshotter(tmp_path / "root", vm_mode=True)
    top = commit_chain(sn, 2)
    want = _host_view(sn, "default/3/host-view", top, tmp_path)
    (mount,) = sn.prepare("default/4/container", top)
    files = [d.path for d in _devices([mount])]
    target = tmp_path / "rootfs"
    target.mkdir()
    fsmount.set_file_backed(False)
    try:
        mount_helper.mount(mount.source, str(target), list(mount.options))
    finally:
        fsmount.set_file_backed(None)
    try:
        got = tree_view(target)
        assert (
            diff_views(
                {k: v for k, v in got.items() if k != "."},
                {k: v for k, v in want.items() if k != "."},
            )
            == []
        )
        assert set(files) <= set(_loop_backing_files())
    finally:
        subprocess.run(["umount", str(target)], check=True)
    assert _eventually(lambda: not set(files) & set(_loop_backing_files()))


def test_mount_program_refuses_what_the_snapshotter_did_not_hand_out(tmp_path: Path) -> None:
    """One line, exit 1, nothing mounted: a description elsewhere, an unknown option."""
    require_root()
    env = mount_program_env(tmp_path)
    sn = Snapshotter(tmp_path / "root", vm_mode=True)
    top = commit_chain(sn, 1)
    (mount,) = sn.prepare("default/2/container", top)
    target = tmp_path / "rootfs"
    target.mkdir()
    stray = tmp_path / "fsmeta.json"
    stray.write_text(Path(mount.source).with_name("fsmeta.json").read_text())
    cases = [
        (
            [*mount.options[:-1], f"erofs-passthrough.description={stray}"],
            "is not fsmeta.json in the chain directory",
        ),
        ([*mount.options, "lowerdir=/etc"], "unknown mount option 'lowerdir=/etc'"),
        (
            [o for o in mount.options if not o.startswith("workdir=")],
            "upperdir and workdir come together",
        ),
        (
            [o for o in mount.options if "description" not in o],
            "carries 0 erofs-passthrough.description options",
        ),
    ]
    for options, message in cases:
        proc = containerd_mount(type(mount)(mount.type, mount.source, options), target, env)
        assert proc.returncode != 0
        assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert len([line for line in proc.stderr.splitlines() if MOUNT_PROGRAM in line]) == 1
        assert not _mounts_of(target)


def test_500_layer_vm_mode_options_fit_one_page_and_mount(tmp_path: Path) -> None:
    """The options of a 500-layer VM-mode snapshot stay far below the kernel's one page
    (inline devices were 5.3 KB for 4 layers), and the mount program mounts all 500."""
    require_root()
    env = mount_program_env(tmp_path)
    sn = Snapshotter(tmp_path / "root", vm_mode=True)
    parent = ""
    for n in range(1, 501):
        key = f"default/{n}/extract-{n}"
        mounts = sn.prepare(key, parent)
        fs = (
            Path(mounts[0].source)
            if mounts[0].type == "bind"
            else next(
                Path(o.split("=", 1)[1]) for o in mounts[0].options if o.startswith("upperdir=")
            )
        )
        (fs / f"f{n}").write_text(f"layer {n}\n")
        sn.commit(f"default/{n}/sha256:layer{n}", key)
        parent = f"default/{n}/sha256:layer{n}"
    for mounts in (
        sn.prepare("default/501/container", parent),
        sn.view("default/502/view", parent),
    ):
        (mount,) = mounts
        assert len(",".join(mount.options)) < 4096
        assert len(_devices(mounts)) == 501
    target = tmp_path / "rootfs"
    target.mkdir()
    proc = containerd_mount(sn.mounts("default/501/container")[0], target, env)
    assert proc.returncode == 0, proc.stderr
    try:
        for n in (1, 250, 500):
            assert (target / f"f{n}").read_text() == f"layer {n}\n"
    finally:
        subprocess.run(["umount", str(target)], check=True)


def test_file_backed_probe_matches_the_kernel_and_layers_use_it(tmp_path: Path) -> None:
    """The probe's answer is what this kernel does with a real image given as a regular file,
    and host layer mounts follow it: the file itself as the source, or a loop device that is
    gone once the layer is unmounted."""
    require_root()
    from snapshotter.service import hostmount

    sn = Snapshotter(tmp_path / "root")
    commit_chain(sn, 1)
    unmount_below(tmp_path)
    blob = next((tmp_path / "root" / "snapshots").glob("*/layer.erofs"))
    fsmount.set_file_backed(None)
    try:
        fd = fsmount._mount_detached(str(blob), [], fsmount.MOUNT_FLAGS["ro"], b"erofs")
        os.close(fd)
        kernel_mounts_files = True
    except OSError:
        kernel_mounts_files = False
    assert fsmount.file_backed_supported() == kernel_mounts_files
    target = tmp_path / "layer"
    target.mkdir()
    for file_backed in (kernel_mounts_files, False):
        fsmount.set_file_backed(file_backed)
        try:
            hostmount.mount_erofs(blob, target)
        finally:
            fsmount.set_file_backed(None)
        (line,) = _mounts_of(target)
        source = line.split()[0]
        assert (target / "etc" / "from-layer-1").read_text() == "layer 1\n"
        hostmount.unmount_all(target)
        if file_backed:
            assert source == str(blob)
        else:
            assert source.startswith("/dev/loop")
            bound = Path(f"/sys/block/{source.removeprefix('/dev/')}/loop")
            assert _eventually(lambda bound=bound: not bound.exists())
