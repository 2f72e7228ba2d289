"""`ctr run --snapshotter erofs-py` with runc on a VM-mode image: a private containerd (1.6,
the system's; 1.7 and 2.1 when their builds are present) with `serve` set to `vm_mode = true`
for every snapshot. The rootfs is the one `fuse.erofs-passthrough-mount` mount; containerd's
shim runs mount.fuse for it, which runs our mount program. The container reads the image's
files and sees what the same image shows on containerd's own overlayfs snapshotter."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from shim_integration.testbed.containerd_private import Stack
from shim_integration.testbed.oci_archive import build_image, chain_ids
from snapshotter.service.vm_mode import MOUNT_TYPE
from tests.support.containerd import (
    IMAGE,
    LIST_SCRIPT,
    OURS,
    THEIRS,
    VERSIONS,
    image_layers,
)
from tests.support.helpers import require_root, require_tool
from tests.support.vm_mode import mount_program_env

pytestmark = [pytest.mark.containerd, pytest.mark.root]


@pytest.fixture(scope="module", params=["1.6", "1.7", "2.1"])
def vm_stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Stack, str]]:
    """The running stack with the image imported for both snapshotters, and its top chain."""
    require_root()
    require_tool("veritysetup")
    dist = VERSIONS[request.param]()
    base = Path(tempfile.mkdtemp(prefix=f"ctd-vm-{dist.version}-"))
    env = mount_program_env(tmp_path_factory.mktemp("bin"))
    with pytest.MonkeyPatch.context() as patch:
        # containerd's shim and ctr (which mounts the rootfs too) find mount.fuse, and
        # mount.fuse our program, on their PATH
        patch.setenv("PATH", env["PATH"])
        config = base / "serve.toml"
        config.write_text("vm_mode = true\n")
        running = Stack(dist, base, service_args=["--config", str(config)]).start()
        try:
            info = build_image(image_layers(), IMAGE, base / "image.tar")
            for snapshotter in (OURS, THEIRS):
                running.containerd.ctr(
                    "images", "import", "--snapshotter", snapshotter, str(base / "image.tar")
                )
            yield running, chain_ids(info["diff_ids"])[-1]
        finally:
            running.stop()
            shutil.rmtree(base, ignore_errors=True)


def test_runc_reads_a_vm_mode_image(vm_stack: tuple[Stack, str]) -> None:
    stack, top = vm_stack
    ctr = stack.containerd.ctr
    ctr("snapshots", "--snapshotter", OURS, "prepare", "probe-rootfs", top)
    listed = ctr("snapshots", "--snapshotter", OURS, "mounts", "/mnt", "probe-rootfs").stdout
    assert f"-t {MOUNT_TYPE}" in listed and "device=" not in listed, listed
    assert len(listed) < 4096
    ctr("snapshots", "--snapshotter", OURS, "rm", "probe-rootfs")

    ours = stack.containerd.run_output(OURS, IMAGE, "vm-ours", LIST_SCRIPT)
    theirs = stack.containerd.run_output(THEIRS, IMAGE, "vm-theirs", LIST_SCRIPT)
    assert ours == theirs
    names = {line.split()[0] for line in ours.splitlines() if line.startswith("/")}
    assert {"/data/opq/new", "/data/sub/second", "/data/xattr-link"} <= names
    assert {"/data/gone", "/data/olddir", "/data/opq/hidden"}.isdisjoint(names)
    written = stack.containerd.run_output(
        OURS, IMAGE, "vm-write", "echo hi > /data/new && cat /data/new /data/sub/deep"
    )
    assert written == "hi\ndeep\n"
