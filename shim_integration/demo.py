"""`erofs-passthrough demo`: the main job end to end, printing what it proves.

For now: build a sample layer from files on this machine, convert it, mount it with the
kernel and compare every file. Later issues grow this into the full guest demo.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import stat
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

from snapshotter.erofs import convert_layer
from snapshotter.errors import EpError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="run the main job end to end and show what it proves")
    p.add_argument("--source", default="/usr/share/doc",
                   help="directory packed into the sample layer")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def _sample_layer(source: Path, out: Path) -> int:
    with tarfile.open(out, "w:gz", compresslevel=1) as tar:
        tar.add(source, arcname=source.name)
        wh = tarfile.TarInfo(f"{source.name}/.wh.removed-by-this-layer")
        tar.addfile(wh, io.BytesIO(b""))
    return out.stat().st_size


def _tree_digest(root: Path) -> tuple[int, str]:
    """Count and digest of every non-directory below root: names, file contents, link targets.
    Symlinks are never followed (their targets may point outside the tree)."""
    h = hashlib.sha256()
    count = 0
    stack = [root]
    while stack:
        directory = stack.pop()
        for entry in sorted(os.scandir(directory), key=lambda e: e.name, reverse=True):
            path = Path(entry.path)
            if entry.is_dir(follow_symlinks=False):
                stack.append(path)
                continue
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                continue  # an overlay whiteout: not a file of the source
            count += 1
            h.update(str(path.relative_to(root)).encode())
            if entry.is_symlink():
                h.update(os.readlink(path).encode())
            elif stat.S_ISREG(st.st_mode):
                h.update(hashlib.sha256(path.read_bytes()).digest())
    return count, h.hexdigest()


def run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise EpError("the demo mounts images: run it as root")
    source = Path(args.source)
    steps: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="erofs-demo-") as tmp:
        work = Path(tmp)
        t = time.monotonic()
        layer = work / "layer.tar.gz"
        size = _sample_layer(source, layer)
        steps["build_layer_s"] = time.monotonic() - t
        print(f"[1/3] sample layer from {source}: {size} bytes of tar.gz")

        t = time.monotonic()
        result = convert_layer(layer, work / "layer.erofs", verity=True)
        steps["convert_s"] = time.monotonic() - t
        print(f"[2/3] converted in {steps['convert_s']:.2f} s: {result.entries} entries, "
              f"{result.size} bytes of EROFS, diffID {result.diff_id}")
        if result.verity is not None:
            print(f"      dm-verity root hash {result.verity.root_hash}")

        t = time.monotonic()
        mnt = work / "mnt"
        mnt.mkdir()
        subprocess.run(["mount", "-t", "erofs", "-o", "ro,loop", str(result.blob), str(mnt)],
                       check=True)
        try:
            count_img, digest_img = _tree_digest(mnt / source.name)
            whiteout = os.stat(mnt / source.name / "removed-by-this-layer")
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
        count_src, digest_src = _tree_digest(source)
        steps["mount_compare_s"] = time.monotonic() - t
        same = (count_img, digest_img) == (count_src, digest_src)
        print(f"[3/3] kernel mounted it: {count_img} files, content digest "
              f"{'equal to' if same else 'DIFFERENT from'} the source; whiteout is a "
              f"char device {os.major(whiteout.st_rdev)}:{os.minor(whiteout.st_rdev)}")
    if args.json:
        print(json.dumps({"verified_read": same, "diff_id": result.diff_id,
                          "root_hash": result.verity.root_hash if result.verity else None,
                          "timings": steps}))
    return 0 if same else 1
