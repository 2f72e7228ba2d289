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
from collections.abc import Iterator
from pathlib import Path

from snapshotter.erofs.tree import Node, SourceTree, pick_build_time, validate_name
from snapshotter.erofs.writer import DataWriter
from snapshotter.errors import (
    FailedPrecondition,
    InvalidArgument,
    InvalidInput,
    Unsupported,
)

READ_SIZE = 1 << 20
MAX_DEPTH = 512  # one open descriptor per level of the walk
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


class TreeChanged(FailedPrecondition):
    """An entry was replaced while the directory was read (e.g. by a process in a container
    whose upper directory this is): nothing it now points to is read."""


class DirImporter:
    """Walks a directory by descriptor: every entry is opened relative to its parent's open
    descriptor with O_NOFOLLOW, and what was opened must be the inode `lstat` saw; regular files
    are opened O_PATH first and reopened through /proc/self/fd only once they are known to be
    regular files, so a swapped-in symlink, FIFO or device is never followed or opened."""

    def __init__(self, data: DataWriter) -> None:
        self.data = data
        self._inodes: dict[tuple[int, int], Node] = {}
        self.mtimes: Counter[tuple[int, int]] = Counter()
        self.entries = 0
        # Content identity of the tree (names, attributes, data) for a deterministic UUID.
        self.digest = hashlib.sha256()

    def _common(self, st: os.stat_result, xattrs: dict[bytes, bytes]) -> dict:
        mtime = (st.st_mtime_ns // 1_000_000_000, st.st_mtime_ns % 1_000_000_000)
        self.mtimes[mtime] += 1
        self.digest.update(
            repr(
                (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, sorted(xattrs.items()))
            ).encode()
        )
        return dict(
            uid=st.st_uid, gid=st.st_gid, mtime=mtime[0], mtime_nsec=mtime[1], xattrs=xattrs
        )

    def _dir_node(self, st: os.stat_result, fd: int) -> Node:
        return Node(mode=st.st_mode, children={}, **self._common(st, _xattrs(fd)))

    def _file_node(self, path: str, st: os.stat_result, fd: int) -> Node:
        common = self._common(st, _xattrs(fd))
        size = st.st_size
        data = self.data.add_file_fd(fd, size, common["xattrs"], self.digest.update)
        if size >= self.data.hole_chunk:
            # Large files' data is copied in the kernel and read only to be hashed and
            # judged for holes: a write between the two would make the image differ from
            # its identity. (A smaller file is read once, and written from what was read.)
            after = os.fstat(fd)
            if (after.st_size, after.st_mtime_ns, after.st_ctime_ns) != (
                size,
                st.st_mtime_ns,
                st.st_ctime_ns,
            ):
                raise TreeChanged(f"{path}: changed while being read (written to)")
        return Node(mode=st.st_mode, size=size, data=data, **common)

    def _other_node(self, parent_fd: int, name: str, path: str, st: os.stat_result) -> Node:
        """A symlink, device, FIFO or socket: never opened; read through its parent's fd."""
        mode = st.st_mode
        # /proc/self/fd/N is the parent directory itself, never re-resolved by name.
        common = self._common(st, _xattrs(f"/proc/self/fd/{parent_fd}/{name}"))
        if stat.S_ISLNK(mode):
            try:
                target = os.readlink(name, dir_fd=parent_fd)
            except OSError as exc:  # EINVAL: no longer a symlink
                raise TreeChanged(f"{path}: changed while being read ({exc.strerror})") from None
            self.digest.update(os.fsencode(target))
            return Node(mode=stat.S_IFLNK | 0o777, symlink=os.fsencode(target), **common)
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            rdev = (os.major(st.st_rdev), os.minor(st.st_rdev))
            self.digest.update(repr(rdev).encode())
            return Node(mode=mode, rdev=rdev, **common)
        if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
            return Node(mode=mode, **common)
        raise Unsupported(f"{path}: unsupported file type {stat.S_IFMT(mode):#o}")

    def add_tree(self, top: Path) -> Node:
        # TOP itself is the caller's (a snapshot's fs/, a CLI argument): it may be a symlink.
        top_fd, top_st = _open_checked(
            None, str(top), str(top), top.stat(), _DIR_FLAGS & ~os.O_NOFOLLOW
        )
        try:
            root = self._dir_node(top_st, top_fd)
            self._walk(top_fd, str(top), root.dir_children())
        finally:
            os.close(top_fd)
        return root

    def _walk(self, top_fd: int, top: str, root: dict[bytes, Node]) -> None:
        # Depth first with one open descriptor per level; entries in name order. Paths are
        # strings, made once per directory (an entry's only for a message).
        stack = [(top_fd, top, root, iter(sorted(os.listdir(top_fd))))]
        entry = self._entry
        try:
            while stack:
                dir_fd, dir_path, siblings, names = stack[-1]
                for name in names:
                    child = entry(dir_fd, dir_path, siblings, name)
                    if child is not None:
                        if len(stack) >= MAX_DEPTH:
                            os.close(child[0])
                            raise InvalidInput(
                                f"{child[1]}: directories nested deeper than {MAX_DEPTH}"
                            )
                        stack.append(child)
                        break
                else:
                    stack.pop()
                    if dir_fd != top_fd:
                        os.close(dir_fd)
        finally:
            for dir_fd, *_ in stack:
                if dir_fd != top_fd:
                    os.close(dir_fd)

    def _entry(
        self, dir_fd: int, dir_path: str, siblings: dict[bytes, Node], name: str
    ) -> tuple[int, str, dict[bytes, Node], Iterator[str]] | None:
        """Add entry NAME of the directory open as DIR_FD to its children SIBLINGS; for a
        subdirectory return what the walk needs to descend into it (its fd stays open until
        it is done)."""
        bname = os.fsencode(name)
        validate_name(bname)
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            raise TreeChanged(f"{dir_path}/{name}: removed while being read") from None
        self.entries += 1
        self.digest.update(bname + b"\0")
        mode = st.st_mode
        if stat.S_ISREG(mode):
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and key in self._inodes:
                siblings[bname] = self._inodes[key]
                return None
            path = f"{dir_path}/{name}"
            opath, opened = _open_checked(dir_fd, name, path, st, _PATH_FLAGS)
            try:
                fd = os.open(f"/proc/self/fd/{opath}", os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
            finally:
                os.close(opath)
            try:
                # The reopened fd is the O_PATH fd's inode: `opened` describes it.
                child = self._file_node(path, opened, fd)
            finally:
                os.close(fd)
        elif stat.S_ISDIR(mode):
            path = f"{dir_path}/{name}"
            fd, opened = _open_checked(dir_fd, name, path, st, _DIR_FLAGS)
            try:
                child = self._dir_node(opened, fd)
                children = iter(sorted(os.listdir(fd)))
            except BaseException:
                os.close(fd)
                raise
            siblings[bname] = child
            return fd, path, child.dir_children(), children
        else:
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and key in self._inodes:
                siblings[bname] = self._inodes[key]
                return None
            child = self._other_node(dir_fd, name, f"{dir_path}/{name}", st)
        if st.st_nlink > 1:
            self._inodes[(st.st_dev, st.st_ino)] = child
        siblings[bname] = child
        return None


def _open_checked(
    dir_fd: int | None, name: str, path: str, st: os.stat_result, flags: int
) -> tuple[int, os.stat_result]:
    """Open NAME (relative to DIR_FD) with FLAGS and check it is the inode ST describes; the
    descriptor and its fstat."""
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise TreeChanged(f"{path}: changed while being read ({exc.strerror})") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a symlink now: O_NOFOLLOW refused it
            raise TreeChanged(f"{path}: changed while being read (now a symlink)") from None
        raise
    opened = os.fstat(fd)
    if (opened.st_dev, opened.st_ino, stat.S_IFMT(opened.st_mode)) != (
        st.st_dev,
        st.st_ino,
        stat.S_IFMT(st.st_mode),
    ):
        os.close(fd)
        raise TreeChanged(f"{path}: changed while being read (replaced by another file)")
    return fd, opened


def _xattrs(target: int | str) -> dict[bytes, bytes]:
    """Extended attributes of an open file (fd) or of a path whose last component is not
    followed."""
    try:
        names = (
            os.listxattr(target, follow_symlinks=False)
            if isinstance(target, str)
            else os.listxattr(target)
        )
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return {}
        if exc.errno == errno.ENOENT:
            raise TreeChanged(f"{target}: removed while being read") from None
        raise
    out = {}
    for name in names:
        try:
            value = (
                os.getxattr(target, name, follow_symlinks=False)
                if isinstance(target, str)
                else os.getxattr(target, name)
            )
        except OSError as exc:
            if exc.errno not in (errno.ENODATA, errno.EPERM):
                raise
            continue
        out[os.fsencode(name)] = value
    return out


def import_directory(top: Path, data: DataWriter) -> tuple[SourceTree, str]:
    """The tree below `top`, and a sha256 identity of its content (names, attributes, data)."""
    if not top.is_dir():
        raise InvalidArgument(f"{top}: not a directory")
    importer = DirImporter(data)
    root = importer.add_tree(top)
    build_time, nsec = pick_build_time(importer.mtimes)
    tree = SourceTree(root, build_time, nsec, importer.entries)
    return tree, "sha256:" + importer.digest.hexdigest()
