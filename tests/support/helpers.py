"""Helpers the tests share: real mounts through the host kernel, and requirements checks."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapshotter.fsmount import mount_erofs


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount EROFS images (runs in CI as root)")
    if not Path("/dev/loop-control").exists():
        pytest.skip("needs loop devices (/dev/loop-control missing)")


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"needs {name} on PATH (installed by .ci/setup)")
    return path


@contextlib.contextmanager
def mounted_erofs(image: Path, devices: list[Path] | None = None) -> Iterator[Path]:
    """Mount IMAGE with the host kernel's EROFS (`-o loop`, extra devices as `device=`)."""
    require_root()
    mnt = Path(tempfile.mkdtemp(prefix="erofs-mnt-"))
    loops: list[str] = []
    opts = ["ro"]
    try:
        for dev in devices or []:
            loop = subprocess.run(
                ["losetup", "--find", "--show", "--read-only", str(dev)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout.strip()
            loops.append(loop)
            opts.append(f"device={loop}")
        proc = subprocess.run(
            ["mount", "-t", "erofs", "-o", ",".join([*opts, "loop"]), str(image), str(mnt)],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            dmesg = subprocess.run(["dmesg"], capture_output=True, text=True).stdout
            tail = "\n".join(dmesg.splitlines()[-5:])
            raise AssertionError(f"kernel refused to mount {image}: {proc.stderr}\n{tail}")
        try:
            yield mnt
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
    finally:
        for loop in loops:
            subprocess.run(["losetup", "-d", loop], check=False)
        mnt.rmdir()


def unmount_below(path: Path) -> None:
    """Unmount every mount at or below PATH, deepest first (what a test left mounted)."""
    prefix = str(path.resolve())
    with open("/proc/self/mounts") as f:
        targets = [line.split()[1].encode().decode("unicode_escape") for line in f]
    for target in sorted(
        (t for t in targets if t == prefix or t.startswith(prefix + "/")), key=len, reverse=True
    ):
        subprocess.run(["umount", "-l", target], check=False, capture_output=True)


def error_lines(stderr: str) -> list[str]:
    """`stderr` without the service's structured log records below error level (JSON lines):
    a preflight warning about the host (no device-mapper here, say) is a log record, not part
    of the one line a refused command prints."""
    kept = []
    for line in stderr.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict) and record.get("level") in ("debug", "info", "warning"):
            continue
        kept.append(line)
    return kept


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *expected: str) -> None:
    """What a user gets from the CLI on bad input: a non-zero exit and one line on stderr,
    `erofs-passthrough COMMAND: ...`, containing each EXPECTED piece; never a traceback."""
    assert proc.returncode != 0, f"succeeded: {proc.stdout!r}"
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("erofs-passthrough "), lines[0]
    for text in expected:
        assert text in lines[0], lines[0]


@contextlib.contextmanager
def loop_devices(paths: list[Path]) -> Iterator[list[str]]:
    loops: list[str] = []
    try:
        for p in paths:
            loops.append(
                subprocess.run(
                    ["losetup", "--find", "--show", "--read-only", str(p)],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout.strip()
            )
        yield loops
    finally:
        for loop in loops:
            subprocess.run(["losetup", "-d", loop], check=False)


@contextlib.contextmanager
def overlay_of(layers: list[Path]) -> Iterator[Path]:
    """The kernel's overlayfs over the layer images (each mounted read-only), lowest first."""
    with contextlib.ExitStack() as stack:
        lowers = [stack.enter_context(mounted_erofs(p)) for p in layers]
        mnt = Path(tempfile.mkdtemp(prefix="ovl-"))
        subprocess.run(
            [
                "mount",
                "-t",
                "overlay",
                "overlay",
                "-o",
                "ro,lowerdir=" + ":".join(str(p) for p in reversed(lowers)),
                str(mnt),
            ],
            check=True,
        )
        try:
            yield mnt
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
            mnt.rmdir()


@contextlib.contextmanager
def mounted_fsmeta(fsmeta: Path, blobs: list[Path]) -> Iterator[Path]:
    """fsmeta + blobs through the new mount API: one fsconfig call per device."""
    with loop_devices([fsmeta, *blobs]) as loops:
        mnt = Path(tempfile.mkdtemp(prefix="fsmeta-"))
        mount_erofs(loops[0], str(mnt), loops[1:])
        try:
            yield mnt
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
            mnt.rmdir()
