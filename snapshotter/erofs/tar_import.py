"""An OCI layer tar, streamed into an inode tree with its file data already in the image.

Tar semantics as an unpacker applies them: a later entry for the same path replaces the
earlier one (a directory entry over a directory only updates its attributes); hardlinks share
the inode of an earlier entry of the same archive. OCI whiteouts are kept the way overlayfs
reads them and `mkfs.erofs --tar=f --aufs` writes them: `.wh.NAME` becomes a character device
0:0 called NAME, `.wh..wh..opq` sets `trusted.overlay.opaque=y` on its directory, and a
directory holding whiteouts gets an empty `trusted.overlay.origin` (so overlayfs never iterates
it directly and shows a whiteout).

Hostile input is refused, not sanitised: absolute names, `..`, a path through a symlink or a
file, hardlinks to missing entries or directories.
"""

from __future__ import annotations

import base64
import stat
import tarfile
import urllib.parse
from collections import Counter

from snapshotter.errors import EpError

from .tree import Node, SourceTree, pick_build_time, validate_name
from .writer import DataWriter

WHITEOUT_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"
OPAQUE_XATTR = b"trusted.overlay.opaque"
ORIGIN_XATTR = b"trusted.overlay.origin"
TAR_BUFSIZE = 1 << 20


def split_member_path(name: str) -> list[bytes]:
    """A member name as path components, refusing names that would leave the layer."""
    raw = name.encode("utf-8", "surrogateescape")
    if raw.startswith(b"/"):
        raise EpError(f"absolute member name {name!r} in layer")
    parts = [p for p in raw.split(b"/") if p and p != b"."]
    if b".." in parts:
        raise EpError(f"member name {name!r} contains '..'")
    for part in parts:
        validate_name(part)
    return parts


def _mtime(info: tarfile.TarInfo) -> tuple[int, int]:
    """Exact (seconds, nanoseconds): PAX mtimes carry a decimal fraction tarfile rounds."""
    text = info.pax_headers.get("mtime")
    if text:
        try:
            sec, _, frac = text.partition(".")
            seconds = int(sec)
            nsec = int((frac + "000000000")[:9]) if frac else 0
            if seconds < 0 and nsec:
                seconds, nsec = seconds - 1, 1_000_000_000 - nsec
            return seconds, nsec
        except ValueError:
            raise EpError(f"{info.name}: bad PAX mtime {text!r}") from None
    return int(info.mtime), 0


def _xattrs(info: tarfile.TarInfo) -> dict[bytes, bytes]:
    """Extended attributes from PAX records: SCHILY.xattr.* (GNU tar, Docker, Go's
    archive/tar) and LIBARCHIVE.xattr.* (bsdtar; URL-encoded name, base64 value)."""
    out: dict[bytes, bytes] = {}
    for key, value in info.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            name = key[len("SCHILY.xattr."):].encode("utf-8", "surrogateescape")
            out[name] = value.encode("utf-8", "surrogateescape")
        elif key.startswith("LIBARCHIVE.xattr."):
            name = urllib.parse.unquote_to_bytes(key[len("LIBARCHIVE.xattr."):])
            padded = value + "=" * (-len(value) % 4)
            out.setdefault(name, base64.b64decode(padded))
    return out


class TarImporter:
    """Builds the tree entry by entry; file data goes straight to the `DataWriter`."""

    def __init__(self, data: DataWriter) -> None:
        self.data = data
        self.root = Node.directory(0o755)
        self._implicit: list[Node] = [self.root]
        self._root_explicit = False
        self._mtimes: Counter[tuple[int, int]] = Counter()
        self.entries = 0

    def _parent(self, parts: list[bytes], name: str) -> Node:
        """The directory holding the last component, creating missing ones (mode 0755)."""
        node = self.root
        for part in parts[:-1]:
            child = node.children.get(part)
            if child is None:
                child = Node.directory(0o755)
                self._implicit.append(child)
                node.children[part] = child
            elif not child.is_dir:
                kind = "a symlink" if stat.S_ISLNK(child.mode) else "not a directory"
                raise EpError(f"{name!r}: path component {part.decode(errors='replace')!r} "
                              f"is {kind}")
            node = child
        return node

    def _lookup(self, parts: list[bytes]) -> Node | None:
        node: Node | None = self.root
        for part in parts:
            if node is None or not node.is_dir:
                return None
            node = node.children.get(part)
        return node

    def add(self, info: tarfile.TarInfo, read) -> None:
        """One tar member; `read(n)` reads its data."""
        self.entries += 1
        parts = split_member_path(info.name)
        mtime = _mtime(info)
        self._mtimes[mtime] += 1
        if not parts:
            if not info.isdir():
                raise EpError(f"{info.name!r}: the layer root is not a directory")
            self._set_attrs(self.root, info, mtime)
            self._root_explicit = True
            return
        name = parts[-1]
        if name == OPAQUE_MARKER:
            parent = self._parent(parts, info.name)
            parent.xattrs[OPAQUE_XATTR] = b"y"
            return
        if name.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
            return  # other AUFS metadata (.wh..wh.plnk, ...): not part of the image
        parent = self._parent(parts, info.name)
        if name.startswith(WHITEOUT_PREFIX):
            target = name[len(WHITEOUT_PREFIX):]
            validate_name(target)
            node = Node(mode=stat.S_IFCHR | (info.mode & 0o7777), rdev=(0, 0))
            self._set_attrs(node, info, mtime)
            self._replace(parent, target, node)
            parent.xattrs[ORIGIN_XATTR] = b""
            return
        node = self._node_for(info, parts, read)
        if node is None:
            return
        if node.children is not None or not info.islnk():
            self._set_attrs(node, info, mtime)
        self._replace(parent, name, node)

    def _node_for(self, info: tarfile.TarInfo, parts: list[bytes], read) -> Node | None:
        if info.isdir():
            existing = self._lookup(parts)
            if existing is not None and existing.is_dir:
                if existing in self._implicit:
                    self._implicit.remove(existing)
                self._set_attrs(existing, info, _mtime(info))
                return None
            return Node.directory(info.mode)
        if info.islnk():
            target_parts = split_member_path(info.linkname)
            target = self._lookup(target_parts)
            if target is None:
                raise EpError(f"{info.name!r}: hardlink to missing entry {info.linkname!r}")
            if target.is_dir:
                raise EpError(f"{info.name!r}: hardlink to a directory {info.linkname!r}")
            return target
        perm = info.mode & 0o7777
        if info.issym():
            return Node(mode=stat.S_IFLNK | 0o777,
                        symlink=info.linkname.encode("utf-8", "surrogateescape"))
        if info.ischr() or info.isblk():
            kind = stat.S_IFCHR if info.ischr() else stat.S_IFBLK
            return Node(mode=kind | perm, rdev=(info.devmajor, info.devminor))
        if info.isfifo():
            return Node(mode=stat.S_IFIFO | perm)
        if info.isreg() or info.type not in tarfile.SUPPORTED_TYPES:
            size = info.size
            data = self.data.add_file(read, size)
            return Node(mode=stat.S_IFREG | perm, size=size, data=data)
        raise EpError(f"{info.name!r}: unsupported tar entry type {info.type!r}")

    @staticmethod
    def _set_attrs(node: Node, info: tarfile.TarInfo, mtime: tuple[int, int]) -> None:
        node.mode = stat.S_IFMT(node.mode) | (info.mode & 0o7777)
        if stat.S_ISLNK(node.mode):
            node.mode = stat.S_IFLNK | 0o777
        # (uid_t)-1 is "no id" to Linux: such a file would be unreadable even by root.
        if not (0 <= info.uid < 0xFFFFFFFF and 0 <= info.gid < 0xFFFFFFFF):
            raise EpError(f"{info.name!r}: uid/gid {info.uid}/{info.gid} is not a valid "
                          "Linux id")
        node.uid, node.gid = info.uid, info.gid
        node.mtime, node.mtime_nsec = mtime
        xattrs = _xattrs(info)
        if node.is_dir:
            # Keep the whiteout markers earlier entries of this directory set.
            kept = {k: v for k, v in node.xattrs.items() if k in (OPAQUE_XATTR, ORIGIN_XATTR)}
            node.xattrs = {**xattrs, **kept}
        else:
            node.xattrs = xattrs

    @staticmethod
    def _replace(parent: Node, name: bytes, node: Node) -> None:
        """A later entry wins; a directory over a directory was handled by the caller."""
        parent.children[name] = node

    def finish(self) -> SourceTree:
        """Give implicit directories the build time: the most common mtime in the layer."""
        build_time, nsec = pick_build_time(self._mtimes)
        for node in self._implicit:
            if node is self.root and self._root_explicit:
                continue
            node.mtime, node.mtime_nsec = build_time, nsec
        return SourceTree(self.root, build_time, nsec, self.entries)


def import_tar(stream, data: DataWriter) -> SourceTree:
    """Read a whole tar stream (`stream.read`) into a tree; file data goes to `data`."""
    importer = TarImporter(data)
    try:
        with tarfile.open(fileobj=stream, mode="r|", bufsize=TAR_BUFSIZE) as tar:
            for info in tar:
                has_data = info.isreg() or info.type not in tarfile.SUPPORTED_TYPES
                if has_data and info.size:
                    fobj = tar.extractfile(info)
                    importer.add(info, fobj.read)
                else:
                    importer.add(info, _no_data)
    except tarfile.TarError as exc:
        raise EpError(f"corrupt tar: {exc}") from None
    except EOFError as exc:
        raise EpError(f"truncated tar: {exc}") from None
    return importer.finish()


def _no_data(size: int) -> bytes:
    raise EpError("tar entry without data")
