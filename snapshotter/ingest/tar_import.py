"""An OCI layer tar, streamed into an inode tree with its file data already in the image.

Tar semantics as an unpacker applies them: a later entry for the same path replaces the
earlier one (a directory entry over a directory only updates its attributes); hardlinks share
the inode of an earlier entry of the same archive. OCI whiteouts are kept the way overlayfs
reads them and `mkfs.erofs --tar=f --aufs` writes them: `.wh.NAME` becomes a character device
0:0 called NAME, `.wh..wh..opq` sets `trusted.overlay.opaque=y` on its directory, and a
directory holding whiteouts gets an empty `trusted.overlay.origin` (so overlayfs never iterates
it directly and shows a whiteout).

Hostile input is refused, not sanitised: absolute names, `..`, a path through a symlink or a
file, hardlinks to missing entries or directories, ids Linux cannot represent, symlink targets
Linux cannot create, device numbers EROFS cannot store, xattrs EROFS cannot store. What a layer
may cost is bounded by `Limits`: entries, path length and depth, and the metadata the tree
holds (names, targets, xattrs, chunk indexes, a fixed cost per inode) are counted as the tar
is read, so memory never grows past `max_metadata_bytes`.
"""

from __future__ import annotations

import stat
from collections import Counter

from snapshotter.erofs.format import FormatError, split_xattr_name
from snapshotter.erofs.limits import (
    DEFAULT_LIMITS,
    DEV_MAJOR_MAX,
    DEV_MINOR_MAX,
    SYMLINK_TARGET_MAX,
    XATTR_INLINE_MAX,
    XATTR_NAME_MAX,
    XATTR_VALUE_MAX,
    XATTRS_PER_FILE_MAX,
    Limits,
)
from snapshotter.erofs.tree import Chunks, Node, SourceTree, pick_build_time, validate_name
from snapshotter.erofs.writer import CHUNK_INDEX_COST, DataWriter
from snapshotter.errors import InvalidInput
from snapshotter.ingest import tarstream as ts
from snapshotter.ingest.tarstream import TarMember, TarReader
from snapshotter.ingest.whiteouts import AUFS_META_PREFIX, OPAQUE_MARKER, WHITEOUT_PREFIX

OPAQUE_XATTR = b"trusted.overlay.opaque"
ORIGIN_XATTR = b"trusted.overlay.origin"
# What an inode costs in memory beyond its names and attributes: the Node, its dicts, and the
# writer's per-inode layout records (measured: ~0.6 KiB; rounded up).
NODE_COST = 1024
# The members `_new_node` builds other than regular files (directories and hardlinks never
# reach it); stat's constants as ints for the hot loop.
_NOT_REGULAR = frozenset((ts.SYMLINK, ts.CHRDEV, ts.BLKDEV, ts.FIFO))
_S_IFREG = stat.S_IFREG
_S_IFMT = 0o170000
_S_IFDIR = stat.S_IFDIR


def split_member_path(name: bytes, limits: Limits = DEFAULT_LIMITS) -> list[bytes]:
    """A member name as path components, refusing names that would leave the layer or that
    exceed the path limits."""
    if len(name) > limits.max_path_bytes:
        raise InvalidInput(
            f"member name {_show(name[:60])!r}... is {len(name)} bytes, over the "
            f"limit of {limits.max_path_bytes} (max_path_bytes)"
        )
    if name.startswith(b"/"):
        raise InvalidInput(f"absolute member name {_show(name)!r} in layer")
    parts = [p for p in name.split(b"/") if p and p != b"."]
    if len(parts) > limits.max_path_depth:
        raise InvalidInput(
            f"member name {_show(name[:60])!r}... has {len(parts)} components, "
            f"over the limit of {limits.max_path_depth} (max_path_depth)"
        )
    if b".." in parts:
        raise InvalidInput(f"member name {_show(name)!r} contains '..'")
    if b"\0" in name or any(len(p) > 255 for p in parts):
        for part in parts:
            validate_name(part)  # raises, naming the bad component
    return parts


class TarImporter:
    """Builds the tree member by member; file data goes straight to the `DataWriter`."""

    def __init__(self, data: DataWriter, limits: Limits = DEFAULT_LIMITS) -> None:
        self.data = data
        self.limits = limits
        self.metadata_bytes = NODE_COST  # the root
        self.root = Node.directory(0o755)
        self._implicit: set[int] = {id(self.root)}
        self._implicit_nodes: list[Node] = [self.root]
        self._mtimes: Counter[tuple[int, int]] = Counter()
        self.entries = 0
        # Parent directories by the path that names them in the tar (b"" is the root): tars
        # list a directory's entries together, and each member's parent is then one dict
        # lookup instead of a walk from the root. Dropped whole when a directory is replaced.
        self._dirs: dict[bytes, tuple[Node, dict[bytes, Node]]] = {}
        self._fast_path_bytes = min(255, limits.max_path_bytes)

    def _parent(self, parts: list[bytes], name: bytes) -> Node:
        """The directory holding the last component, creating missing ones (mode 0755)."""
        node = self.root
        for part in parts[:-1]:
            children = node.dir_children()
            child = children.get(part)
            if child is None or _is_whiteout(child):
                self._charge(NODE_COST + len(part), name)
                child = self._implicit_dir(replaces_whiteout=child is not None)
                children[part] = child
            elif not child.is_dir:
                kind = "a symlink" if stat.S_ISLNK(child.mode) else "not a directory"
                raise InvalidInput(f"{_show(name)!r}: path component {_show(part)!r} is {kind}")
            node = child
        return node

    def _implicit_dir(self, replaces_whiteout: bool) -> Node:
        child = Node.directory(0o755)
        if replaces_whiteout:
            # Deleted earlier in this layer, then written into: nothing below shows through.
            child.xattrs[OPAQUE_XATTR] = b"y"
        self._implicit.add(id(child))
        self._implicit_nodes.append(child)
        return child

    def _lookup(self, parts: list[bytes]) -> Node | None:
        node: Node | None = self.root
        for part in parts:
            if node is None or not node.is_dir:
                return None
            node = node.dir_children().get(part)
        return node

    def _charge(self, nbytes: int, name: bytes) -> None:
        """Count `nbytes` of tree memory against `max_metadata_bytes`."""
        self.metadata_bytes += nbytes
        if self.metadata_bytes > self.limits.max_metadata_bytes:
            raise InvalidInput(
                f"{_show(name[:100])!r}: the layer's metadata exceeds "
                f"{self.limits.max_metadata_bytes} bytes (max_metadata_bytes)"
            )

    def add(self, m: TarMember, read) -> None:
        """One tar member; `read(n)` reads its stored data (for a sparse member, the bytes
        of its data runs back to back).

        The hot loop of a layer import, written flat: the common member (a plain path, no
        whiteout, a regular file, directory or symlink) takes one pass with its parent
        directory found by path in `_dirs`, not walked from the root; everything else takes
        the general code, which judges it (and words its errors) as before."""
        self.entries += 1
        limits = self.limits
        if self.entries > limits.max_entries:
            raise InvalidInput(
                f"the layer has more than {limits.max_entries} entries (max_entries)"
            )
        path = m.name
        stem = path[2:] if path[:2] == b"./" else path  # as `tar -C DIR .` writes names
        parts = stem.split(b"/")
        if not parts[-1]:
            parts.pop()  # a directory's trailing slash
            stem = stem[:-1]
        if (
            len(path) > self._fast_path_bytes  # the general checks: limit, components > 255
            or len(parts) > limits.max_path_depth
            or b"" in parts  # absolute, or doubled slashes
            or b"." in parts
            or b".." in parts
            or b"\0" in path
        ):
            parts = split_member_path(path, limits)  # raises, or the cleaned components
            key = b"/".join(parts[:-1])
        else:
            key = stem[: len(stem) - len(parts[-1]) - 1] if len(parts) > 1 else b""
        flag = m.typeflag
        if m.xattrs or flag == ts.SYMLINK or flag == ts.CHRDEV or flag == ts.BLKDEV:
            _check_member(m)
            cost = NODE_COST + len(path) + len(m.linkname)
            if m.xattrs:
                cost += sum(len(k) + len(v) for k, v in m.xattrs.items())
        else:
            cost = NODE_COST + len(path) + len(m.linkname)
        self.metadata_bytes += cost
        if self.metadata_bytes > limits.max_metadata_bytes:
            self._charge(0, path)  # raises
        self._mtimes[(m.mtime, m.mtime_nsec)] += 1
        if not parts:
            if flag != ts.DIRECTORY:
                raise InvalidInput(f"{_show(path)!r}: the layer root is not a directory")
            self._set_attrs(self.root, m)
            self._implicit.discard(id(self.root))
            return
        if WHITEOUT_PREFIX in path and self._whiteout_member(m, parts, key):
            return
        name = parts[-1]
        found = self._dirs.get(key)
        if found is None:
            parent = self._parent(parts, path)
            found = self._dirs[key] = (parent, parent.dir_children())
        siblings = found[1]
        if flag == ts.DIRECTORY:
            existing = siblings.get(name)
            if existing is not None and stat.S_ISDIR(existing.mode):
                self._implicit.discard(id(existing))
                self._set_attrs(existing, m)  # a directory over a directory: attributes only
                return
            node = Node.directory()
            if existing is not None and _is_whiteout(existing):
                # `.wh.X` then `X/` in one layer (OCI: the whiteout applies to the layers
                # below, the new X to this one): X must hide what lies below it.
                node.xattrs[OPAQUE_XATTR] = b"y"
            self._set_attrs(node, m)
            siblings[name] = node  # replaces no directory: the cache stays right
            return
        if flag == ts.HARDLINK:
            node = self._link_target(m)
        elif flag not in _NOT_REGULAR and m.sparse is None:
            # A regular file (or, as GNU tar reads them, a member of unknown type): `_new_node`'s
            # last case, written here with the Node built whole, attributes and all.
            data = self.data.add_file(read, m.size, m.xattrs)
            if data.__class__ is Chunks:
                self._charge(len(data.blkaddrs) * CHUNK_INDEX_COST, path)
            uid, gid = m.uid, m.gid
            if not (0 <= uid < 0xFFFFFFFF and 0 <= gid < 0xFFFFFFFF):
                self._set_attrs(Node(stat.S_IFREG), m)  # raises
            node = Node(
                _S_IFREG | (m.mode & 0o7777),
                uid,
                gid,
                m.mtime,
                m.mtime_nsec,
                m.size,
                data,
                xattrs=m.xattrs,  # the member's own dict, nothing else holds it
            )
        else:
            node = self._new_node(m, read)
            # (uid_t)-1 is "no id" to Linux: such a file would be unreadable even by root.
            if not (0 <= m.uid < 0xFFFFFFFF and 0 <= m.gid < 0xFFFFFFFF):
                self._set_attrs(node, m)  # raises
            node.mode |= 0o777 if flag == ts.SYMLINK else m.mode & 0o7777
            node.uid, node.gid = m.uid, m.gid
            node.mtime, node.mtime_nsec = m.mtime, m.mtime_nsec
            node.xattrs = m.xattrs  # the member's own dict, nothing else holds it
        # A later entry wins; a directory replaced drops the parent cache (see `_replace`).
        old = siblings.get(name)
        if old is not None and old.mode & _S_IFMT == _S_IFDIR:
            self._dirs.clear()
        siblings[name] = node

    def _replace(self, siblings: dict[bytes, Node], name: bytes, node: Node) -> None:
        """`siblings[name] = node`; a directory replaced drops the parent cache (its paths, and
        the paths below it, now lead elsewhere or nowhere)."""
        old = siblings.get(name)
        if old is not None and stat.S_ISDIR(old.mode):
            self._dirs.clear()
        siblings[name] = node

    def _whiteout_member(self, m: TarMember, parts: list[bytes], key: bytes) -> bool:
        """The members whose name holds `.wh.`: AUFS bookkeeping (skipped), the opaque marker
        and whiteouts (applied); False for any other, which `add` then builds."""
        name = parts[-1]
        if AUFS_META_PREFIX in m.name and any(
            p.startswith(AUFS_META_PREFIX) and p != OPAQUE_MARKER for p in parts
        ):
            return True  # AUFS bookkeeping (.wh..wh.plnk/...), not part of the image
        if name == OPAQUE_MARKER:
            self._parent(parts, m.name).xattrs[OPAQUE_XATTR] = b"y"
            return True
        if not name.startswith(WHITEOUT_PREFIX):
            return False
        parent = self._parent(parts, m.name)
        target = name[len(WHITEOUT_PREFIX) :]
        validate_name(target)
        node = Node(mode=stat.S_IFCHR, rdev=(0, 0))
        self._set_attrs(node, m)
        self._replace(parent.dir_children(), target, node)
        parent.xattrs[ORIGIN_XATTR] = b""
        return True

    def _link_target(self, m: TarMember) -> Node:
        target = self._lookup(split_member_path(m.linkname, self.limits))
        if target is None:
            raise InvalidInput(
                f"{_show(m.name)!r}: hardlink to missing entry {_show(m.linkname)!r}"
            )
        if target.is_dir:
            raise InvalidInput(f"{_show(m.name)!r}: hardlink to a directory {_show(m.linkname)!r}")
        return target

    def _new_node(self, m: TarMember, read) -> Node:
        flag = m.typeflag
        if flag == ts.SYMLINK:
            return Node(mode=stat.S_IFLNK, symlink=m.linkname)
        if flag in (ts.CHRDEV, ts.BLKDEV):
            kind = stat.S_IFCHR if flag == ts.CHRDEV else stat.S_IFBLK
            return Node(mode=kind, rdev=(m.devmajor, m.devminor))
        if flag == ts.FIFO:
            return Node(mode=stat.S_IFIFO)
        # Regular files, and (as GNU tar does) members of unknown type.
        if m.sparse is not None:
            room = (self.limits.max_metadata_bytes - self.metadata_bytes) // CHUNK_INDEX_COST
            data = self.data.add_sparse(m.sparse, m.size, read, max_indexes=max(room, 1))
        else:
            data = self.data.add_file(read, m.size, m.xattrs)
        if isinstance(data, Chunks):
            self._charge(len(data.blkaddrs) * CHUNK_INDEX_COST, m.name)
        return Node(mode=stat.S_IFREG, size=m.size, data=data)

    @staticmethod
    def _set_attrs(node: Node, m: TarMember) -> None:
        # (uid_t)-1 is "no id" to Linux: such a file would be unreadable even by root.
        if not (0 <= m.uid < 0xFFFFFFFF and 0 <= m.gid < 0xFFFFFFFF):
            raise InvalidInput(
                f"{_show(m.name)!r}: uid/gid {m.uid}/{m.gid} is not a valid Linux id"
            )
        perm = 0o777 if stat.S_ISLNK(node.mode) else m.mode & 0o7777
        node.mode = stat.S_IFMT(node.mode) | perm
        node.uid, node.gid = m.uid, m.gid
        node.mtime, node.mtime_nsec = m.mtime, m.mtime_nsec
        if node.is_dir:
            # A directory listed again is updated, as unpackers do: earlier xattrs (and the
            # whiteout markers this layer set) stay unless the new entry sets them anew.
            node.xattrs = {**node.xattrs, **m.xattrs}
        else:
            node.xattrs = m.xattrs  # the member's own dict, nothing else holds it

    def finish(self) -> SourceTree:
        """Give implicit directories the build time: the most common mtime in the layer."""
        build_time, nsec = pick_build_time(self._mtimes)
        for node in self._implicit_nodes:
            if id(node) in self._implicit:
                node.mtime, node.mtime_nsec = build_time, nsec
        return SourceTree(self.root, build_time, nsec, self.entries)


def _check_member(m: TarMember) -> None:
    """What Linux or EROFS cannot represent, refused before anything is built from it."""
    if m.typeflag == ts.SYMLINK and len(m.linkname) > SYMLINK_TARGET_MAX:
        raise InvalidInput(
            f"{_show(m.name)!r}: symlink target of {len(m.linkname)} bytes (Linux "
            f"takes at most {SYMLINK_TARGET_MAX})"
        )
    if m.typeflag == ts.SYMLINK and not m.linkname:
        raise InvalidInput(f"{_show(m.name)!r}: empty symlink target")
    if m.typeflag in (ts.CHRDEV, ts.BLKDEV) and not (
        0 <= m.devmajor <= DEV_MAJOR_MAX and 0 <= m.devminor <= DEV_MINOR_MAX
    ):
        raise InvalidInput(
            f"{_show(m.name)!r}: device {m.devmajor}:{m.devminor} cannot be stored "
            f"(EROFS and Linux's u32 dev_t: major <= {DEV_MAJOR_MAX}, minor <= "
            f"{DEV_MINOR_MAX})"
        )
    if m.xattrs:
        _check_xattrs(m)


def _check_xattrs(m: TarMember) -> None:
    if len(m.xattrs) > XATTRS_PER_FILE_MAX:
        raise InvalidInput(
            f"{_show(m.name)!r}: {len(m.xattrs)} xattrs, EROFS stores at most "
            f"{XATTRS_PER_FILE_MAX} per file"
        )
    total = 0
    for key, value in m.xattrs.items():
        try:
            _, suffix = split_xattr_name(key)
        except FormatError as exc:
            raise InvalidInput(f"{_show(m.name)!r}: {exc}") from None
        if len(suffix) > XATTR_NAME_MAX or len(value) > XATTR_VALUE_MAX:
            raise InvalidInput(
                f"{_show(m.name)!r}: xattr {_show(key[:60])!r} too large for EROFS "
                f"(name suffix <= {XATTR_NAME_MAX}, value <= {XATTR_VALUE_MAX} "
                "bytes)"
            )
        total += (4 + len(suffix) + len(value) + 3) & ~3
    if total > XATTR_INLINE_MAX:
        raise InvalidInput(
            f"{_show(m.name)!r}: {total} bytes of xattrs, EROFS stores at most "
            f"{XATTR_INLINE_MAX} per file"
        )


def _is_whiteout(node: Node) -> bool:
    return stat.S_ISCHR(node.mode) and node.rdev == (0, 0)


def _show(name: bytes) -> str:
    return name.decode("utf-8", "replace")


def import_tar(
    stream: ts.Readable, data: DataWriter, limits: Limits = DEFAULT_LIMITS
) -> SourceTree:
    """Read a whole tar stream into a tree; file data goes to `data`."""
    importer = TarImporter(data, limits)
    reader = TarReader(stream, limits)
    for member in reader:
        importer.add(member, reader.read_data)
    return importer.finish()
