"""The fsmeta merge: an image's layer blobs become one metadata-only EROFS.

Layers are applied bottom to top with overlayfs' rules, as a guest would see them stacked:
a whiteout (character device 0:0) removes the entry below it, an opaque directory
(`trusted.overlay.opaque=y`) hides everything below it, any other entry replaces what was
there (a directory over a directory merges, the upper one's attributes win), and hardlinks stay
linked within their layer. No whiteout and no `trusted.overlay.*` xattr remains in the result.

Regular files become chunk-based inodes whose chunk indexes address (device, block) in the
layer blob that holds their data: device i is the i-th layer given (1 = lowest). The device
table names each blob by a tag (its sha256 digest in hex, or its EROFS UUID) with its block
count, and gives each a start block (`uniaddr`) in a flat address space of *whole files*: the
fsmeta's file (image plus its appended dm-verity tree) first, then each layer's file (blob
plus its appended tree) in device order. So the same fsmeta mounts with one `device=` per
blob, or, on kernels with flat multi-blob support (Linux >= 6.3), as one flat image, and that
flat image is just the files joined whole (`cat fsmeta layer1 layer2 ...`), which is what
Kata's fsmerge mode and `mkfs.erofs --vmdk-desc` users build.

The kernel (fs/erofs/super.c `erofs_init_device`, data.c `erofs_map_dev`) uses a slot's
`blocks` only for statfs and, without a flat device, to find which device a device-0 address
falls in; chunk indexes name their device, so a device file longer than `blocks` (its tree
after the image) is fine. `blocks` keeps erofs-utils' meaning: the blob image's own blocks.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import struct
import uuid
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from snapshotter.accel import compiled
from snapshotter.erofs.format import (
    CHUNK_FORMAT_INDEXES,
    LAYOUT_CHUNK_BASED,
    NULL_ADDR,
    DeviceSlot,
    SuperBlock,
    decode_dev,
)
from snapshotter.erofs.reader import (
    ChunkRef,
    ErofsImage,
    InodeFields,
    ScanDir,
    fields_data_pos,
    fields_isize,
)
from snapshotter.erofs.tree import (
    Chunks,
    Extent,
    InlineTail,
    Node,
    PackedChunks,
)
from snapshotter.erofs.writer import DataWriter, ImageParams, header_blocks, write_metadata
from snapshotter.errors import (
    CorruptImage,
    EpError,
    InvalidArgument,
    InvalidInput,
    NotFound,
    Unsupported,
)
from snapshotter.fsutil import atomic_output
from snapshotter.gcpause import collector_paused

if TYPE_CHECKING:
    from snapshotter.verity import VerityInfo, VerityParams

# The optional compiled directory scan (_mergescan.c): each directory's entries and their
# inodes in one call (`ErofsImage.entries_fields`), the same tuples as the pure-Python path,
# and a layer's (or a parent fsmeta's) common file as the very Node the pure loop makes of
# it. `SCAN(None, ...)` gives fields only. `EROFS_PASSTHROUGH_PURE=1` (read at import)
# forces the pure path, as for verity hashing.
_mergescan = compiled("snapshotter.fsmeta._mergescan")  # (accel.py)
SCAN: Callable[..., list[tuple[bytes, int, Any]] | None] | None = (
    None if _mergescan is None else _mergescan.scan_dir
)
#: True when the compiled scan is in use (not forced off, built and importable)
ACCELERATED = SCAN is not None

OVERLAY_XATTR_PREFIX = b"trusted.overlay."
OPAQUE_XATTR = b"trusted.overlay.opaque"
FSMETA_UUID_NAMESPACE = uuid.UUID("0e1b7f4c-2b8e-4f39-a7a5-63f4a1d5c0de")
MAX_CHUNKBITS = 31


@dataclass(frozen=True)
class LayerBlob:
    """A layer image to merge; `tag` names it in the device table (at most 64 bytes)."""

    path: Path
    tag: str | None = None  # default: the image's UUID as 32 hex digits


@dataclass(frozen=True)
class MergedDevice:
    path: Path
    tag: str
    blocks: int  # the blob's primary-device blocks (its EROFS image, no verity tree)
    uniaddr: int  # start block in the flat address space
    file_size: int  # bytes of the whole blob file (image plus any appended verity tree)

    def span(self, block_size: int) -> int:
        """Blocks the whole file takes in the flat address space."""
        return max(self.blocks, -(-self.file_size // block_size))


@dataclass(frozen=True)
class MergeTree:
    """The merged tree (its build time is picked by the writer: the most common mtime of
    the result, which a merge continuing from a parent's fsmeta knows as well)."""

    root: Node
    devices: list[MergedDevice]
    block_size: int


def _strip_overlay(xattrs: dict[bytes, bytes]) -> dict[bytes, bytes]:
    if not xattrs:
        return xattrs
    return {k: v for k, v in xattrs.items() if not k.startswith(OVERLAY_XATTR_PREFIX)}


_EMPTY_XATTRS: dict[bytes, bytes] = {}  # shared by every merged inode without xattrs: never mutated
_S_IFMT, _S_IFDIR, _S_IFREG, _S_IFLNK = 0o170000, 0o040000, 0o100000, 0o120000
_S_IFCHR, _S_IFBLK = 0o020000, 0o060000
_LAYOUT_FLAT_PLAIN, _LAYOUT_FLAT_INLINE = 0, 2
_CHUNK_INDEX = struct.Struct("<HHI")  # ChunkIndex's bytes: advise, device, block


def _node_spec() -> tuple[object, ...] | None:
    """How the compiled scan makes the node of a layer's common file: the slots it sets
    (mode, uid, gid, mtime, mtime_nsec, size, data: the inode's and its PackedChunks), and
    every other field's value (no xattrs, the dataclass' defaults). None, so fields only,
    if a field's default is made per instance (a factory) or the classes run code when
    made (`__post_init__`): the scan would not make the same objects."""
    given = ("mode", "uid", "gid", "mtime", "mtime_nsec", "size", "data")
    rest: list[tuple[str, object]] = []
    for f in dataclasses.fields(Node):
        if f.name in given:
            continue
        if f.name == "xattrs":
            rest.append((f.name, _EMPTY_XATTRS))
        elif f.default is not dataclasses.MISSING:
            rest.append((f.name, f.default))
        else:
            return None
    packed = tuple(f.name for f in dataclasses.fields(PackedChunks))
    if hasattr(Node, "__post_init__") or hasattr(PackedChunks, "__post_init__"):
        return None
    return (Node, PackedChunks, given, tuple(rest), packed)


_NODE_SPEC = _node_spec()


def _scan(spec: tuple[object, ...] | None) -> ScanDir | None:
    """The compiled scan (if in use) with its `files` argument: None, or what a layer's
    common files become."""
    return None if SCAN is None else functools.partial(SCAN, spec)


class _LayerApplier:
    """Applies one layer image onto the merged tree.

    Inodes are read as tuples (`ErofsImage.inode_fields`), not objects: a merge visits every
    inode of every layer, and an object per inode and per chunk was over half its time. The
    common file of a layer (one extent, or a small file inline) becomes its `PackedChunks` or
    `InlineTail` right here; anything else takes the reader's general `data_map`."""

    def __init__(self, img: ErofsImage, device: int, data: DataWriter) -> None:
        self.img = img
        self.device = device
        self.data = data
        self.bs = img.block_size
        self.links: dict[int, Node] = {}  # nid -> node, for hardlinks within the layer
        self.budget = img.sb.blocks * img.block_size

    def apply_root(self, root: Node) -> None:
        nid = self.img.root_nid
        fields = self.img.inode_fields(nid)
        xattrs = _xattrs(self.img, nid, fields)
        if xattrs.get(OPAQUE_XATTR) == b"y":
            root.dir_children().clear()
        _set_attrs(root, fields, xattrs)
        self._apply_dir(root, nid, fields)

    def _apply_dir(self, target: Node, dir_nid: int, dir_fields: InodeFields) -> None:
        """Directories are walked by their `inode_fields`, as their parents' entries give
        them: a small layer's few directories then cost no inode object each."""
        img = self.img
        stack = [(target, dir_nid, dir_fields)]
        seen: set[int] = set()
        links = self.links
        bs, sb_blocks, device = self.bs, img.sb.blocks, self.device
        pack_index = _CHUNK_INDEX.pack
        dir_entries_fields = img.dir_entries_fields
        # The compiled scan makes a common file's node as the loop below does.
        scan = _scan(None if _NODE_SPEC is None else (*_NODE_SPEC, device, sb_blocks))
        while stack:
            target, dir_nid, dir_fields = stack.pop()
            if dir_nid in seen:
                raise CorruptImage(f"{img.name}: directory nid {dir_nid} appears twice (a cycle)")
            seen.add(dir_nid)
            children = target.dir_children()
            self._charge(dir_fields[5])  # its size
            # Every name is checked (1..255 bytes, no '/' nor NUL), every inode read.
            for name, nid, fields in dir_entries_fields(dir_nid, dir_fields, scan):
                node = links.get(nid)
                if node is not None:  # another name of an inode of this layer
                    children[name] = node
                    continue
                if type(fields) is Node:  # the scan's node of a common file (see below)
                    self.budget -= 4
                    if self.budget < 0:
                        self._charge(0)
                    links[nid] = fields
                    children[name] = fields
                    continue
                fmt = fields[3] & _S_IFMT
                if fmt == _S_IFREG and fields[1] & 0xE == 0 and not fields[2] and fields[5]:
                    # The common file, kept in this loop: one extent (FLAT_PLAIN), no xattrs.
                    _pos, _fw, _ic, mode, _nl, size, i_u, uid, gid, mtime, nsec = fields
                    nblocks = -(-size // bs)
                    bits = (nblocks - 1).bit_length()
                    if i_u + nblocks > sb_blocks or bits > MAX_CHUNKBITS or size >= 1 << 63:
                        children[name] = self._leaf(nid, fields)  # checks, and says why
                        continue
                    self.budget -= 4
                    if self.budget < 0:
                        self._charge(0)
                    node = Node(
                        mode,
                        uid,
                        gid,
                        mtime,
                        nsec,
                        size,
                        PackedChunks(bits, pack_index(0, device, i_u)),
                        xattrs=_EMPTY_XATTRS,
                    )
                    links[nid] = node
                    children[name] = node
                elif fmt == _S_IFDIR:
                    xattrs = _xattrs(img, nid, fields)
                    existing = children.get(name)
                    if (
                        existing is None
                        or existing.children is None
                        or xattrs.get(OPAQUE_XATTR) == b"y"
                    ):
                        existing = Node.directory()
                        children[name] = existing
                    _set_attrs(existing, fields, xattrs)
                    stack.append((existing, nid, fields))
                elif fmt == _S_IFCHR and fields[6] == 0:  # a whiteout
                    children.pop(name, None)
                else:
                    children[name] = self._leaf(nid, fields)

    def _leaf(self, nid: int, fields: InodeFields) -> Node:
        """A non-directory inode as a new node (remembered by nid: entries naming one inode
        are one file, as the kernel shows them, and a hostile nlink of 1 on an inode named a
        thousand times cannot make its chunk table be read a thousand times)."""
        _pos, _fw, _ic, mode, _nlink, size, i_u, uid, gid, mtime, nsec = fields
        img = self.img
        xattrs = _strip_overlay(_xattrs(img, nid, fields))
        node = Node(mode=mode, uid=uid, gid=gid, mtime=mtime, mtime_nsec=nsec, xattrs=xattrs)
        fmt = mode & _S_IFMT
        if fmt == _S_IFREG:
            node.size = size
            if size:
                node.data = self._file_data(nid, fields)
        elif fmt == _S_IFLNK:
            node.symlink = img.readlink(img.inode(nid))
        elif fmt in (_S_IFCHR, _S_IFBLK):
            node.rdev = decode_dev(i_u)
        self.links[nid] = node
        return node

    def _file_data(
        self, nid: int, fields: InodeFields
    ) -> PackedChunks | Chunks | InlineTail | None:
        """Where the file's data lies, as the fsmeta will address it. The two layouts our
        layers use are decided here, with the reader's checks; the rest go through
        `data_map`."""
        fmt_word, size, i_u = fields[1], fields[5], fields[6]
        layout = (fmt_word >> 1) & 7
        bs = self.bs
        if layout == _LAYOUT_FLAT_PLAIN and size < 1 << 63:
            total_blocks = -(-size // bs)
            bits = (total_blocks - 1).bit_length()
            if bits <= MAX_CHUNKBITS:  # one extent, one chunk index
                self.img.check_blocks(nid, 0, i_u, size)
                self._charge(4)
                if i_u >= NULL_ADDR:  # check_blocks bounds it already; never trust blindly
                    raise InvalidInput(
                        f"{self.img.name}: data block {i_u} beyond 32-bit addressing"
                    )
                return PackedChunks(bits, _CHUNK_INDEX.pack(0, self.device, i_u))
        elif layout == _LAYOUT_FLAT_INLINE and size < bs:
            # A small file stored inline in its layer stays inline in the fsmeta.
            tail_pos = fields_data_pos(fields)
            if tail_pos % bs + size > bs:
                raise CorruptImage(f"{self.img.name}: nid {nid}: inline data crosses a block")
            if tail_pos + size > self.img.sb.blocks * bs:
                raise CorruptImage(f"{self.img.name}: nid {nid}: inline data beyond the image")
            self._charge(4)
            return InlineTail(None, self.img.read_at(tail_pos, size))
        info = self.img.inode(nid)
        return self._chunks(self.img.data_map(info), size)

    def _chunks(self, refs: list[ChunkRef], size: int) -> Chunks | InlineTail | None:
        """Chunk indexes addressing the file's data where it lies in this layer's blob.

        Files stored wholly inline in their layer (small ones) stay inline in the fsmeta; so
        does a tail after whole blocks (tail-packed layers), its whole blocks addressed on
        the layer's device in the flat address space (the writer falls back to a block of
        its own in the fsmeta when the tail does not fit beside the merged inode).
        The chunk size is the largest power of two (at most 2^31 blocks) that every piece
        boundary is aligned to, and there is one index per chunk of the whole size: the
        kernel finds chunk i's index at position i, whatever lies there.
        """
        if not refs:
            return None
        bs = self.bs
        self._charge(4 * len(refs))
        if len(refs) == 1 and refs[0].inline_pos is not None:
            # A small file stored inline in its layer stays inline in the fsmeta.
            return InlineTail(None, self.img.read_at(refs[0].inline_pos, refs[0].length))
        head_addr, tail_pos = refs[0].blkaddr, refs[-1].inline_pos
        if len(refs) == 2 and tail_pos is not None and head_addr is not None:
            # FLAT_INLINE: data_map checked both, on the layer's device 0
            return InlineTail(
                Extent(head_addr, refs[0].length // bs, self.device),
                self.img.read_at(tail_pos, refs[1].length),
            )
        pieces: list[tuple[int, int, int | None]] = []  # (offset, device, blkaddr; None: hole)
        for ref in refs:
            if ref.device:
                raise Unsupported(f"{self.img.name}: layer is itself multi-device")
            if ref.inline_pos is not None:
                tail = self.img.read_at(ref.inline_pos, ref.length)
                pieces.append((ref.offset, 0, self.data.add_blocks(tail).start))
            else:
                pieces.append((ref.offset, self.device, ref.blkaddr))
        total_blocks = -(-size // bs)
        bits = max(0, (total_blocks - 1).bit_length())
        for offset, _, _ in pieces[1:]:
            block = offset // bs
            bits = min(bits, (block & -block).bit_length() - 1)
        bits = min(bits, MAX_CHUNKBITS)
        chunk_blocks = 1 << bits
        count = -(-total_blocks // chunk_blocks)
        addrs = array("I", [NULL_ADDR]) * count
        devices = array("H", [0]) * count
        chunk_bytes = chunk_blocks * bs
        ends = [p[0] for p in pieces[1:]] + [size]
        for (offset, device, blkaddr), end in zip(pieces, ends, strict=True):
            if blkaddr is None:
                continue  # a hole: the chunks stay NULL_ADDR
            first = offset // chunk_bytes
            last_addr = blkaddr + (-(-end // chunk_bytes) - 1 - first) * chunk_blocks
            if last_addr >= NULL_ADDR:  # the reader checked the range; never trust it blindly
                raise InvalidInput(
                    f"{self.img.name}: data block {last_addr} beyond 32-bit addressing"
                )
            for i in range(first, -(-end // chunk_bytes)):
                addrs[i] = blkaddr + (i - first) * chunk_blocks
                devices[i] = device
        return Chunks(bits, addrs, devices)

    def _charge(self, nbytes: int) -> None:
        """Directory bytes and chunk references read so far may not exceed the layer's size:
        in a real image they never do, in a hostile one (many inodes sharing one huge chunk
        table or directory) the merge's work would otherwise grow with the square of it."""
        self.budget -= nbytes
        if self.budget < 0:
            raise CorruptImage(
                f"{self.img.name}: directories and chunk tables take more bytes "
                "than the image has (they overlap)"
            )


def build_merged_tree(
    layers: list[LayerBlob],
    data: DataWriter,
    progress: Callable[[str], None] | None = None,
    parent: Path | None = None,
) -> MergeTree:
    """Apply the layers (lowest first) into one tree; file data stays in the layers.
    `progress` is told each step as it starts. `parent`: the fsmeta of a prefix of these
    layers (a parent chain's), whose tree is taken as it is and only the layers above it
    applied; if it cannot be continued exactly (see `_parent_tree`), every layer is."""
    root = Node.directory()
    images: list[ErofsImage] = []
    try:
        infos = []
        for layer in layers:  # each opened once: its device entry, then its tree
            images.append(ErofsImage(layer.path))
            infos.append(_layer_device(layer, images[-1]))
        block_size = infos[0][1].block_size if infos else 4096
        start = 0
        if parent is not None:
            lower = _parent_tree(parent, infos)
            if lower is not None:
                root, start = lower
                if progress is not None:
                    progress(f"layers 1-{start} from {parent}")
        for index, (layer, img) in enumerate(zip(layers, images, strict=True), start=1):
            if index <= start:
                continue
            if progress is not None:
                progress(f"layer {index}/{len(layers)} {layer.path}")
            if img.block_size != block_size:
                raise InvalidArgument(
                    f"{layer.path}: block size {img.block_size} differs from the "
                    f"other layers' {block_size}"
                )
            _LayerApplier(img, index, data).apply_root(root)
    finally:
        for img in images:
            img.close()
    devices = [device for device, _sb in infos]
    return MergeTree(root, devices, block_size)


def _layer_device(layer: LayerBlob, img: ErofsImage) -> tuple[MergedDevice, SuperBlock]:
    """A layer's device-table entry (and superblock), its image checked to be mergeable."""
    if img.device_slots:
        raise Unsupported(f"{layer.path}: a multi-device image cannot be merged as a layer")
    tag = layer.tag or img.sb.uuid.hex()
    file_size = img.file_size  # as opened: the bytes mapped are the bytes counted
    if file_size < img.sb.blocks * img.block_size:
        raise CorruptImage(
            f"{layer.path}: {file_size} bytes, shorter than the "
            f"{img.sb.blocks} blocks its superblock counts (truncated)"
        )
    device = MergedDevice(
        path=layer.path, tag=tag, blocks=img.sb.blocks, uniaddr=0, file_size=file_size
    )
    return device, img.sb


class _NotContinuable(Exception):
    """A parent fsmeta whose tree alone does not determine the merge's bytes."""


def _parent_tree(
    parent: Path, layers: list[tuple[MergedDevice, SuperBlock]]
) -> tuple[Node, int] | None:
    """The merged tree of the first k layers read back from their fsmeta `parent`, and k;
    None when the merge must start from the lowest layer instead.

    The fsmeta holds the whole merged tree (every attribute; chunk indexes already naming
    (device, block) in the layer blobs), which is all a merge from scratch would carry
    from those k layers into the result, so applying the other layers on it gives the same
    bytes (tests/kernel/test_incremental_merge.py checks). Not continued: a parent whose
    device table is not these layers' first k (tags, blocks), one holding data of its own
    (tails of other tools' layers copied into it, and with them the blocks they took, which
    the tree does not say), one that is not ours or unreadable: merged from scratch, the
    result is the same, only slower."""
    try:
        with ErofsImage(parent) as img:
            slots = img.device_slots
            k = len(slots)
            if not 0 < k < len(layers) + 1 or img.block_size != layers[0][1].block_size:
                return None
            for slot, (device, _sb) in zip(slots, layers, strict=False):
                if slot.tag != device.tag.encode() or slot.blocks != device.blocks:
                    return None
            return _FsmetaReader(img, k).tree(), k
    except (_NotContinuable, EpError, OSError):
        return None


class _FsmetaReader:
    """Reads an fsmeta we wrote back into the tree it was written from."""

    def __init__(self, img: ErofsImage, devices: int) -> None:
        self.img = img
        self.devices = devices
        self.bs = img.block_size
        self.links: dict[int, Node] = {}
        self.budget = img.sb.blocks * img.block_size
        # The lowest metadata block must be the first after the header: no data before it.
        self.first_block = img.sb.meta_blkaddr + 1
        if img.sb.xattr_blkaddr:
            self.first_block = min(self.first_block, img.sb.xattr_blkaddr)

    def tree(self) -> Node:
        img = self.img
        root_fields = img.inode_fields(img.root_nid)
        root = Node.directory()
        _set_attrs(root, root_fields, _xattrs(img, img.root_nid, root_fields))
        stack = [(root, img.root_nid, root_fields)]
        seen: set[int] = set()
        bs, devices, read_at = self.bs, self.devices, img.read_at
        # The compiled scan makes a common file's node as the loop below does.
        spec = None if _NODE_SPEC is None else (*_NODE_SPEC, devices, img.sb.blocks, True)
        scan = _scan(spec)
        while stack:
            target, dir_nid, dir_fields = stack.pop()
            if dir_nid in seen:
                raise CorruptImage(f"{img.name}: directory nid {dir_nid} appears twice")
            seen.add(dir_nid)
            dir_size = dir_fields[5]
            self._data_blocks((dir_fields[1] >> 1) & 7, dir_fields[6], dir_size)
            self._charge(dir_size)
            children = target.dir_children()
            for name, nid, fields in img.dir_entries_fields(dir_nid, dir_fields, scan):
                node = self.links.get(nid)
                if node is not None:
                    children[name] = node
                    continue
                if type(fields) is Node:  # the scan's node of a common file (see below)
                    self._charge(8)
                    self.links[nid] = fields
                    children[name] = fields
                    continue
                pos, fw, icount, mode, _nl, size, i_u, uid, gid, mtime, nsec = fields
                if (
                    mode & _S_IFMT == _S_IFREG
                    and (fw >> 1) & 7 == LAYOUT_CHUNK_BASED
                    and not icount
                    and i_u & ~0x1F == CHUNK_FORMAT_INDEXES
                    and 0 < size <= bs << (i_u & 0x1F)
                ):
                    # The common file, kept in this loop: one chunk index, no xattrs.
                    table = read_at(((pos + (64 if fw & 1 else 32)) + 7) & ~7, 8)
                    _advise, device, addr = _CHUNK_INDEX.unpack(table)
                    if addr != NULL_ADDR and not 0 < device <= devices:
                        raise _NotContinuable(f"nid {nid}: a chunk on device {device}")
                    self._charge(8)
                    node = Node(
                        mode,
                        uid,
                        gid,
                        mtime,
                        nsec,
                        size,
                        PackedChunks(i_u & 0x1F, table),
                        xattrs=_EMPTY_XATTRS,
                    )
                    self.links[nid] = node
                elif mode & _S_IFMT == _S_IFDIR:
                    node = Node.directory()
                    _set_attrs(node, fields, _xattrs(img, nid, fields))
                    stack.append((node, nid, fields))
                else:
                    node = self._leaf(nid, fields)
                children[name] = node
        if header_blocks(self.bs, self.devices) != self.first_block:
            raise _NotContinuable("data blocks before the metadata")
        return root

    def _data_blocks(self, layout: int, i_u: int, size: int) -> None:
        """Note where metadata outside the inode table (directory, symlink blocks) starts."""
        whole_blocks = size >= self.bs if layout == _LAYOUT_FLAT_INLINE else size > 0
        if layout in (_LAYOUT_FLAT_PLAIN, _LAYOUT_FLAT_INLINE) and whole_blocks:
            self.first_block = min(self.first_block, i_u)

    def _leaf(self, nid: int, fields: InodeFields) -> Node:
        _pos, fmt_word, _ic, mode, _nlink, size, i_u, uid, gid, mtime, nsec = fields
        img = self.img
        xattrs = _xattrs(img, nid, fields)
        node = Node(mode=mode, uid=uid, gid=gid, mtime=mtime, mtime_nsec=nsec, xattrs=xattrs)
        fmt = mode & _S_IFMT
        layout = (fmt_word >> 1) & 7
        if fmt == _S_IFREG:
            node.size = size
            if size:
                node.data = self._file_data(nid, fields, layout)
        elif fmt == _S_IFLNK:
            info = img.inode(nid)
            node.symlink = img.readlink(info)
            self._data_blocks(layout, i_u, size)
        elif fmt in (_S_IFCHR, _S_IFBLK):
            node.rdev = decode_dev(i_u)
        self.links[nid] = node
        return node

    def _file_data(self, nid: int, fields: InodeFields, layout: int) -> PackedChunks | InlineTail:
        """What the merge made of the file: its chunk table as it is (each chunk on a layer
        device, or a hole), or its inline bytes. Anything else held data in the fsmeta."""
        img, bs = self.img, self.bs
        size, i_u = fields[5], fields[6]
        data_pos = fields_data_pos(fields)
        if layout == _LAYOUT_FLAT_INLINE and size < bs:
            if data_pos % bs + size > bs or data_pos + size > img.sb.blocks * bs:
                raise CorruptImage(f"{img.name}: nid {nid}: inline data out of place")
            return InlineTail(None, img.read_at(data_pos, size))
        if layout != LAYOUT_CHUNK_BASED or i_u & 0xFFFF & ~0x1F != CHUNK_FORMAT_INDEXES:
            raise _NotContinuable(f"nid {nid}: data in the fsmeta")
        bits = i_u & 0x1F
        count = -(-size // (bs << bits))
        base = (data_pos + 7) & ~7
        self._charge(8 * count)
        table = img.read_at(base, 8 * count)
        for _advise, device, addr in _CHUNK_INDEX.iter_unpack(table):
            if addr != NULL_ADDR and not 0 < device <= self.devices:
                raise _NotContinuable(f"nid {nid}: a chunk on device {device}")
        return PackedChunks(bits, table)

    def _charge(self, nbytes: int) -> None:
        self.budget -= nbytes
        if self.budget < 0:
            raise CorruptImage(f"{self.img.name}: directories and chunk tables overlap")


def _xattrs(img: ErofsImage, nid: int, fields: InodeFields) -> dict[bytes, bytes]:
    """The xattrs of inode `nid` from its `inode_fields` (no InodeInfo made: directories are
    walked by the fields their parents' entries carry)."""
    pos, fmt_word, icount = fields[:3]
    if not icount:
        return _EMPTY_XATTRS
    return img.xattrs_at(nid, pos + fields_isize(fmt_word), icount)


def _set_attrs(node: Node, fields: InodeFields, xattrs: dict[bytes, bytes]) -> None:
    """A directory's attributes from its `inode_fields`, overlay xattrs stripped."""
    node.mode, node.uid, node.gid = fields[3], fields[7], fields[8]
    node.mtime, node.mtime_nsec = fields[9], fields[10]
    node.xattrs = _strip_overlay(xattrs) if xattrs else _EMPTY_XATTRS


@dataclass(frozen=True)
class MergeResult:
    fsmeta: Path
    size: int  # bytes of the fsmeta image (without a verity tree)
    file_size: int  # bytes of the whole fsmeta file: the image plus its appended verity tree
    block_size: int
    devices: list[MergedDevice]
    uuid: str
    entries: int
    verity: VerityInfo | None = None  # of the fsmeta
    digest: str = ""  # sha256 of the fsmeta image (without its verity tree)
    flat: Path | None = None
    flat_size: int | None = None
    flat_verity: VerityInfo | None = None

    def extents(self) -> list[dict]:
        """The flat image's layout, for a hypervisor that presents the devices from it (or
        assembles it from the files): where each whole file (the fsmeta's, then each blob's,
        verity trees included) lies. `image_length` is the EROFS image part of it."""
        bs = self.block_size
        out = [
            {
                "source": str(self.fsmeta),
                "offset": 0,
                "length": self.file_size,
                "image_length": self.size,
            }
        ]
        out += [
            {
                "source": str(d.path),
                "offset": d.uniaddr * bs,
                "length": d.file_size,
                "image_length": d.blocks * bs,
            }
            for d in self.devices
        ]
        return out

    @property
    def concatenable(self) -> bool:
        """Whether joining the files whole (`cat fsmeta blob1 blob2 ...`) gives the flat
        image: every file but the last is a whole number of blocks (ours always are), so
        each starts exactly at its `uniaddr`. Otherwise only `--flat` (which pads) does."""
        bs = self.block_size
        return all(e["length"] % bs == 0 for e in self.extents()[:-1])

    def to_json(self) -> dict:
        return {
            "fsmeta": str(self.fsmeta),
            "size": self.size,
            "file_size": self.file_size,
            "digest": self.digest,
            "block_size": self.block_size,
            "uuid": self.uuid,
            "entries": self.entries,
            "devices": [
                {
                    "id": i,
                    "path": str(d.path),
                    "tag": d.tag,
                    "blocks": d.blocks,
                    "uniaddr": d.uniaddr,
                    "file_size": d.file_size,
                }
                for i, d in enumerate(self.devices, start=1)
            ],
            "verity": self.verity.to_json() if self.verity is not None else None,
            "concatenable": self.concatenable,
            "flat": None
            if self.flat is None
            else {
                "path": str(self.flat),
                "size": self.flat_size,
                "extents": self.extents(),
                "verity": (self.flat_verity.to_json() if self.flat_verity is not None else None),
            },
        }


def merge_layers(
    layers: Sequence[LayerBlob | str | os.PathLike[str]],
    out_path: str | os.PathLike[str],
    *,
    verity: bool | VerityParams = False,
    flat_path: str | os.PathLike[str] | None = None,
    progress: Callable[[str], None] | None = None,
    parent: str | os.PathLike[str] | None = None,
) -> MergeResult:
    """Merge layer images (lowest first) into an fsmeta at `out_path`; optionally also one
    flat image (the fsmeta's file and the blob files, whole, back to back) at `flat_path`.
    With `verity` (True, or the parameters, e.g. `KATA_VERITY` for unsalted trees), each
    output gets its own dm-verity tree appended (a salt derived from the fsmeta's digest
    unless unsalted); the device table already counts the fsmeta's tree, whose size follows
    from the image's size and the tree geometry alone. Outputs appear only when complete.
    `progress` is told each step as it starts (for a status line). `parent`: the fsmeta of
    the first k of these layers (a parent chain's), to continue from instead of merging those
    k again; the result is byte for byte the same either way."""
    # dm-verity only when asked: a merge without it does not pay for importing the builder.
    if verity:
        from snapshotter.erofs.image_verity import append_verity
        from snapshotter.verity import VerityParams, derive_salt
    # A Path as given is kept (no parse again per layer: a merge may name hundreds).
    blobs = [
        b if isinstance(b, LayerBlob) else LayerBlob(b if isinstance(b, Path) else Path(b))
        for b in layers
    ]
    out_path = Path(out_path)
    step = progress or (lambda _text: None)
    tree_params = (VerityParams() if verity is True else verity) or None
    with atomic_output(out_path) as out:
        fd = out.fileno()
        with collector_paused():  # the merged tree: all live until written (gcpause)
            result = _write_fsmeta(
                blobs, fd, progress, tree_params, None if parent is None else Path(parent)
            )
        step("digest and verity tree" if verity else "digest")
        digest = _digest_fd(fd, result.size)
        result = dataclasses.replace(result, fsmeta=out_path, digest=digest)
        if verity:
            result = dataclasses.replace(
                result, verity=append_verity(out, result.size, verity, derive_salt(digest))
            )
        written = os.fstat(fd).st_size
        if written != result.file_size:
            raise AssertionError(
                f"the fsmeta file is {written} bytes, its device table expects {result.file_size}"
            )
    if flat_path is not None:
        flat_path = Path(flat_path)
        step(f"flat image {flat_path}")
        with atomic_output(flat_path) as flat:
            size = _write_flat(result, flat.fileno())
            info = append_verity(flat, size, verity, derive_salt(digest)) if verity else None
        result = dataclasses.replace(result, flat=flat_path, flat_size=size, flat_verity=info)
    return result


def appended_tree_size(image_size: int, params: VerityParams) -> int:
    """Bytes `append_verity` adds after an image of `image_size` bytes: padding to a data
    block, the v1 superblock (if any) padded to a hash block, and the tree. They depend only
    on the size and the geometry, so they are known before the tree is built."""
    from snapshotter.verity.geometry import TreeGeometry, tree_start_block

    data_blocks = -(-image_size // params.data_block_size)
    hash_offset = data_blocks * params.data_block_size
    start = tree_start_block(hash_offset, params.hash_block_size, params.superblock)
    digest_size = hashlib.new(params.hash_name).digest_size
    tree = TreeGeometry.compute(data_blocks, params.hash_block_size, digest_size).tree_size
    return start * params.hash_block_size + tree - image_size


def _write_fsmeta(
    layers: list[LayerBlob],
    fd: int,
    progress: Callable[[str], None] | None = None,
    tree_params: VerityParams | None = None,
    parent: Path | None = None,
) -> MergeResult:
    """Write the fsmeta of `layers` into the open file `fd` (from offset 0). With
    `tree_params`, the device table leaves room for the tree to be appended to it."""
    if not layers:
        raise InvalidArgument("nothing to merge: no layers given")
    if len(layers) > 0xFFFF:
        raise InvalidArgument(f"{len(layers)} layers: EROFS addresses at most 65535 devices")
    bs = _block_size_of(layers[0].path)
    data = DataWriter(fd, bs, header_blocks(bs, len(layers)))
    merged = build_merged_tree(layers, data, progress, parent)
    if progress is not None:
        progress("writing the metadata")
    for d in merged.devices:
        if len(d.tag.encode()) > 64:
            raise InvalidArgument(f"device tag {d.tag!r} longer than 64 bytes")
    identity = "fsmeta:" + ",".join(f"{d.tag}/{d.blocks}" for d in merged.devices)
    fs_uuid = uuid.uuid5(FSMETA_UUID_NAMESPACE, identity)
    if tree_params is not None:
        tree_params.validate()

    def trailing_blocks(image_blocks: int) -> int:
        if tree_params is None:
            return 0
        return -(-appended_tree_size(image_blocks * bs, tree_params) // bs)

    params = ImageParams(
        block_size=bs,
        build_time_from_tree=True,
        uuid=fs_uuid.bytes,
        devices=tuple(DeviceSlot(d.tag.encode(), d.blocks) for d in merged.devices),
        unified_addresses=True,
        device_spans=tuple(d.span(bs) for d in merged.devices),
        trailing_blocks=trailing_blocks,
    )
    sb = write_metadata(data, merged.root, params)
    size = sb.blocks * bs
    file_size = size + (0 if tree_params is None else appended_tree_size(size, tree_params))
    start = sb.blocks + trailing_blocks(sb.blocks)
    devices = []
    for d in merged.devices:  # made directly: dataclasses.replace costs more per layer
        devices.append(MergedDevice(d.path, d.tag, d.blocks, start, d.file_size))
        start += d.span(bs)
    return MergeResult(
        fsmeta=Path(),
        size=size,
        file_size=file_size,
        block_size=bs,
        devices=devices,
        uuid=str(fs_uuid),
        entries=sb.inos,
    )


def _write_flat(result: MergeResult, dst: int) -> int:
    """The fsmeta's file then every blob's file, whole, at their unified addresses (a file
    that is not whole blocks is followed by a hole up to the next one)."""
    end = 0
    for extent in result.extents():
        src = os.open(extent["source"], os.O_RDONLY)
        try:
            copy_range(src, dst, extent["length"], 0, extent["offset"])
        finally:
            os.close(src)
        end = extent["offset"] + extent["length"]
    return end


def _digest_fd(fd: int, size: int) -> str:
    h = hashlib.sha256()
    offset = 0
    while offset < size:
        chunk = os.pread(fd, min(4 << 20, size - offset), offset)
        h.update(chunk)
        offset += len(chunk)
    return "sha256:" + h.hexdigest()


def _block_size_of(path: Path) -> int:
    try:
        with ErofsImage(path) as img:
            return img.block_size
    except FileNotFoundError:
        raise NotFound(f"{path}: no such layer image") from None


def copy_range(src_fd: int, dst_fd: int, length: int, src_offset: int, dst_offset: int) -> None:
    """Copy bytes between files in the kernel (reflinks where the filesystem can)."""
    while length:
        n = os.copy_file_range(src_fd, dst_fd, length, src_offset, dst_offset)
        if n == 0:
            raise CorruptImage("source ended early while copying a blob into the flat image")
        length -= n
        src_offset += n
        dst_offset += n
