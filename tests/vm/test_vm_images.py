"""The guest image builder's pieces (vm-images/): the cpio writer against busybox's cpio, the
module load order against the kernel's modules.dep, the PVH check, and the cache."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

from tests.support.helpers import require_tool

VM_IMAGES = Path(__file__).resolve().parents[2] / "vm-images"


def _load_builder() -> tuple[ModuleType, ModuleType]:
    """vm-images/ is a script directory (its modules import each other by bare name): load
    them with it on sys.path, then take the bare names out again so that nothing else in the
    test run can pick up a module called `common` or `kernel` by accident."""
    names = ("common", "kernel", "initramfs", "rootfs")
    sys.path.insert(0, str(VM_IMAGES))
    try:
        ini, ker = importlib.import_module("initramfs"), importlib.import_module("kernel")
    finally:
        sys.path.remove(str(VM_IMAGES))
        for name in names:
            sys.modules.pop(name, None)
    return ini, ker


initramfs, kernel = _load_builder()


def test_cpio_writer_output_unpacks_with_busybox(tmp_path: Path) -> None:
    busybox = require_tool("busybox")
    archive = initramfs.Cpio()
    archive.add_file("bin/tool", b"#!/bin/sh\necho hi\n", 0o755)
    archive.add_file("etc/deep/conf", b"x" * 1001)
    archive.add_symlink("bin/alias", "tool")
    archive.mkdir("empty/dir")
    data = archive.finish()
    assert len(data) % 512 == 0
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run(
        [busybox, "cpio", "-id"], input=data, cwd=out, capture_output=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert (out / "bin/tool").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert os.stat(out / "bin/tool").st_mode & 0o777 == 0o755
    assert (out / "etc/deep/conf").read_bytes() == b"x" * 1001
    assert os.readlink(out / "bin/alias") == "tool"
    assert (out / "empty/dir").is_dir()


def test_module_order_puts_dependencies_first(tmp_path: Path) -> None:
    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "modules.dep").write_text(
        "kernel/a.ko: kernel/b.ko kernel/c.ko\n"
        "kernel/b.ko: kernel/c.ko\n"
        "kernel/c.ko:\n"
        "kernel/dm-x.ko: kernel/c.ko\n"
    )
    order = [p.name for p in initramfs.module_order(mods, ("a", "dm_x"))]
    assert order == ["c.ko", "b.ko", "a.ko", "dm-x.ko"]
    with pytest.raises(initramfs.BuildError, match="not in"):
        initramfs.module_order(mods, ("nope",))


def test_pvh_note_check(tmp_path: Path) -> None:
    assert not kernel._has_pvh_note(Path(sys.executable).resolve().read_bytes())


@pytest.fixture(scope="module")
def manifest() -> dict:
    if os.geteuid() != 0:
        pytest.skip("needs root: the guest image build runs debootstrap (runs in CI as root)")
    for tool in ("debootstrap", "lz4", "depmod", "apt-get"):
        require_tool(tool)
    proc = subprocess.run(
        [str(VM_IMAGES / "build"), "--json"],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_built_kernel_is_pvh_and_initramfs_is_complete(manifest: dict, tmp_path: Path) -> None:
    assert kernel._has_pvh_note(Path(manifest["kernel"]).read_bytes())
    busybox = require_tool("busybox")
    cpio = Path(manifest["initrd"]).read_bytes()
    listing = (
        subprocess.run([busybox, "cpio", "-t"], input=cpio, capture_output=True, check=True)
        .stdout.decode()
        .split()
    )
    for needed in (
        "init",
        "bin/busybox",
        "sbin/dmsetup",
        "lib64/ld-linux-x86-64.so.2",
        "etc/modules.order",
        "dev/console",
        "lib/modules/dm-verity.ko",
        "lib/modules/erofs.ko",
        "lib/modules/virtio_blk.ko",
    ):
        assert needed in listing, needed
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(
        [busybox, "cpio", "-id", "etc/modules.order"],
        input=cpio,
        cwd=out,
        check=True,
        capture_output=True,
    )
    order = (out / "etc/modules.order").read_text().split()
    modules = Path(manifest["kernel"]).parent / "lib/modules" / manifest["kernel_release"]
    deps = {}
    for line in (modules / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[Path(mod).name.removesuffix(".ko")] = [
            Path(d).name.removesuffix(".ko") for d in rest.split()
        ]
    for i, mod in enumerate(order):
        assert set(deps[mod]) <= set(order[:i]), (mod, deps[mod])


def test_second_build_is_a_cache_hit(manifest: dict) -> None:
    start = time.monotonic()
    proc = subprocess.run(
        [str(VM_IMAGES / "build"), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    again = json.loads(proc.stdout)
    assert time.monotonic() - start < 10
    for key in ("kernel", "initrd", "root_image", "kernel_args"):
        assert again[key] == manifest[key]
    verity = again["root_verity"]
    assert verity["builder"] == "erofs-passthrough convert"
    assert verity["data_block_size"] == 4096
