"""VM-mode snapshot chains as containerd builds them, and the PATH on which mount.fuse finds
our mount program."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

from snapshotter.fsmeta.devices import MOUNT_PROGRAM
from snapshotter.service.snapshots import Snapshotter
from tests.support.helpers import require_tool


def write_layer(fs: Path, n: int) -> None:
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


def commit_chain(sn: Snapshotter, layers: int) -> str:
    """LAYERS snapshots committed on each other as containerd unpacks them (prepare, write the
    upper, commit); the top's name."""
    parent = ""
    for n in range(1, layers + 1):
        key = f"default/{n}/extract-{n}"
        mounts = sn.prepare(key, parent)
        fs = (
            Path(mounts[0].source)
            if mounts[0].type == "bind"
            else next(
                Path(o.split("=", 1)[1]) for o in mounts[0].options if o.startswith("upperdir=")
            )
        )
        write_layer(fs, n)
        name = f"default/{n}/sha256:layer{n}"
        sn.commit(name, key)
        parent = name
    return parent


def mount_program_env(tmp_path: Path) -> dict[str, str]:
    """The environment in which `mount.fuse` finds our mount program on PATH, as containerd's
    does once the package is installed. A venv whose editable install predates the console
    script gets the same two-line entry point pip writes, in TMP_PATH."""
    require_tool("mount.fuse")  # fuse3 (.ci/setup)
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / MOUNT_PROGRAM).exists():
        print(
            f"{MOUNT_PROGRAM} not installed in {bin_dir} (pip install -e . predates it): "
            "using an equivalent entry point",
            file=sys.stderr,
        )
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir(exist_ok=True)
        program = bin_dir / MOUNT_PROGRAM
        program.write_text(
            f"#!{sys.executable}\nimport sys\n"
            "from snapshotter.service.mount_helper import main\nsys.exit(main())\n"
        )
        program.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
