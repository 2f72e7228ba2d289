"""Entry-by-entry views of directory trees, for comparing a mounted image with its source.

A view maps each relative path to what a user would check: type, mode, owner, size, content
hash, link target, device numbers, xattrs and mtime.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class EntryView:
    kind: str
    mode: int
    uid: int
    gid: int
    size: int | None
    content: str | None
    target: str | None
    rdev: tuple[int, int] | None
    xattrs: tuple[tuple[str, bytes], ...]
    mtime_ns: int | None


def _kind(mode: int) -> str:
    return {
        stat.S_IFREG: "file",
        stat.S_IFDIR: "dir",
        stat.S_IFLNK: "symlink",
        stat.S_IFCHR: "chr",
        stat.S_IFBLK: "blk",
        stat.S_IFIFO: "fifo",
        stat.S_IFSOCK: "sock",
    }[stat.S_IFMT(mode)]


def _xattrs(path: Path) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return ()
    out = []
    for name in sorted(names):
        try:
            out.append((name, os.getxattr(path, name, follow_symlinks=False)))
        except OSError:
            continue  # user.* on special files: listed, but not readable through the VFS
    return tuple(out)


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def entry_view(path: Path, *, mtimes: bool = True, dir_sizes: bool = False) -> EntryView:
    st = path.lstat()
    kind = _kind(st.st_mode)
    return EntryView(
        kind=kind,
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        size=st.st_size if kind != "dir" or dir_sizes else None,
        content=file_digest(path) if kind == "file" else None,
        target=os.readlink(path) if kind == "symlink" else None,
        rdev=(os.major(st.st_rdev), os.minor(st.st_rdev)) if kind in ("chr", "blk") else None,
        xattrs=_xattrs(path),
        mtime_ns=st.st_mtime_ns if mtimes and kind != "symlink" else None,
    )


def tree_view(root: Path, *, mtimes: bool = True) -> dict[str, EntryView]:
    """Every entry below `root` (root itself as '.'), with hardlink groups as extra keys."""
    out: dict[str, EntryView] = {".": entry_view(root, mtimes=mtimes)}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            out[str(p.relative_to(root))] = entry_view(p, mtimes=mtimes)
    return out


def hardlink_groups(root: Path) -> list[list[str]]:
    """Paths that share an inode (non-directories), each group sorted, groups sorted."""
    by_ino: dict[tuple[int, int], list[str]] = {}
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            p = Path(dirpath, name)
            st = p.lstat()
            if st.st_nlink > 1:
                by_ino.setdefault((st.st_dev, st.st_ino), []).append(str(p.relative_to(root)))
    return sorted(sorted(g) for g in by_ino.values() if len(g) > 1)


def diff_views(a: dict[str, EntryView], b: dict[str, EntryView]) -> list[str]:
    """Human-readable differences, empty when equal."""
    problems = []
    for path in sorted(a.keys() | b.keys()):
        if path not in a:
            problems.append(f"{path}: only in second")
        elif path not in b:
            problems.append(f"{path}: only in first")
        elif a[path] != b[path]:
            fields = [
                f
                for f in EntryView.__dataclass_fields__
                if getattr(a[path], f) != getattr(b[path], f)
            ]
            problems.append(
                f"{path}: "
                + ", ".join(
                    f"{f} {getattr(a[path], f)!r} != {getattr(b[path], f)!r}" for f in fields
                )
            )
    return problems
