"""An unpacked layer directory (an overlay upper after containerd's walking differ ran) as an
inode tree, its file data streamed into the image.

The directory is taken as it is: whiteouts are already character devices 0:0 and opaque
directories already carry `trusted.overlay.opaque=y`, which is exactly what the image keeps.
Symlinks are never followed; hardlinks (same inode twice) stay one inode.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections import Counter
from pathlib import Path

from snapshotter.errors import EpError

from .tree import Node, SourceTree, pick_build_time, validate_name
from .writer import DataWriter

READ_SIZE = 1 << 20


class DirImporter:
    def __init__(self, data: DataWriter) -> None:
        self.data = data
        self._inodes: dict[tuple[int, int], Node] = {}
        self.mtimes: Counter[tuple[int, int]] = Counter()
        self.entries = 0
        # Content identity of the tree (names, attributes, data) for a deterministic UUID.
        self.digest = hashlib.sha256()

    def _node(self, path: Path, st: os.stat_result) -> Node:
        mode = st.st_mode
        mtime = (st.st_mtime_ns // 1_000_000_000, st.st_mtime_ns % 1_000_000_000)
        self.mtimes[mtime] += 1
        common = dict(uid=st.st_uid, gid=st.st_gid, mtime=mtime[0], mtime_nsec=mtime[1],
                      xattrs=_xattrs(path))
        self.digest.update(repr((mode, st.st_uid, st.st_gid, st.st_mtime_ns,
                                 sorted(common["xattrs"].items()))).encode())
        if stat.S_ISDIR(mode):
            return Node(mode=mode, children={}, **common)
        if stat.S_ISREG(mode):
            size = st.st_size
            with open(path, "rb") as f:
                def read(n: int) -> bytes:
                    chunk = f.read(n)
                    self.digest.update(chunk)
                    return chunk
                data = self.data.add_file(read, size)
            return Node(mode=mode, size=size, data=data, **common)
        if stat.S_ISLNK(mode):
            target = os.readlink(path)
            self.digest.update(os.fsencode(target))
            return Node(mode=stat.S_IFLNK | 0o777, symlink=os.fsencode(target), **common)
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            rdev = (os.major(st.st_rdev), os.minor(st.st_rdev))
            self.digest.update(repr(rdev).encode())
            return Node(mode=mode, rdev=rdev, **common)
        if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
            return Node(mode=mode, **common)
        raise EpError(f"{path}: unsupported file type {stat.S_IFMT(mode):#o}")

    def add_tree(self, top: Path) -> Node:
        root = self._node(top, top.lstat())
        stack = [(top, root)]
        while stack:
            path, node = stack.pop()
            for entry in sorted(os.scandir(path), key=lambda e: e.name):
                name = os.fsencode(entry.name)
                validate_name(name)
                st = entry.stat(follow_symlinks=False)
                self.entries += 1
                self.digest.update(name + b"\0")
                key = (st.st_dev, st.st_ino)
                if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1 and key in self._inodes:
                    node.children[name] = self._inodes[key]
                    continue
                child = self._node(Path(entry.path), st)
                if st.st_nlink > 1 and not child.is_dir:
                    self._inodes[key] = child
                node.children[name] = child
                if child.is_dir:
                    stack.append((Path(entry.path), child))
        return root


def _xattrs(path: Path) -> dict[bytes, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return {}
        raise
    out = {}
    for name in names:
        try:
            out[os.fsencode(name)] = os.getxattr(path, name, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in (errno.ENODATA, errno.EPERM):
                raise
    return out


def import_directory(top: Path, data: DataWriter) -> tuple[SourceTree, str]:
    """The tree below `top`, and a sha256 identity of its content (names, attributes, data)."""
    if not top.is_dir():
        raise EpError(f"{top}: not a directory")
    importer = DirImporter(data)
    root = importer.add_tree(top)
    build_time, nsec = pick_build_time(importer.mtimes)
    tree = SourceTree(root, build_time, nsec, importer.entries)
    return tree, "sha256:" + importer.digest.hexdigest()
