"""The EROFS on-disk format: structures (`format`), the writer, the reader and the inode tree.

Importing it loads no compressor and nothing of the layer ingestion (`snapshotter.ingest`);
the names below are imported from their modules on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from snapshotter.lazy_exports import lazy_exports

if TYPE_CHECKING:
    from snapshotter.erofs.format import (
        ChunkIndex,
        DeviceSlot,
        Dirent,
        FormatError,
        Inode,
        SuperBlock,
        XattrEntry,
    )
    from snapshotter.erofs.limits import (
        DEFAULT_LIMITS,
        Limits,
    )
    from snapshotter.erofs.reader import (
        ChunkRef,
        ErofsImage,
        InodeInfo,
    )
    from snapshotter.erofs.tree import (
        Chunks,
        Extent,
        InlineTail,
        Node,
        SourceTree,
    )
    from snapshotter.erofs.writer import (
        DataWriter,
        ImageParams,
        header_blocks,
        write_metadata,
    )

__all__ = [
    "ErofsImage",
    "InodeInfo",
    "ChunkRef",
    "write_metadata",
    "DataWriter",
    "ImageParams",
    "header_blocks",
    "Node",
    "SourceTree",
    "Extent",
    "Chunks",
    "InlineTail",
    "Limits",
    "DEFAULT_LIMITS",
    "FormatError",
    "SuperBlock",
    "Inode",
    "Dirent",
    "DeviceSlot",
    "ChunkIndex",
    "XattrEntry",
]

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "ErofsImage": "snapshotter.erofs.reader",
        "InodeInfo": "snapshotter.erofs.reader",
        "ChunkRef": "snapshotter.erofs.reader",
        "write_metadata": "snapshotter.erofs.writer",
        "DataWriter": "snapshotter.erofs.writer",
        "ImageParams": "snapshotter.erofs.writer",
        "header_blocks": "snapshotter.erofs.writer",
        "Node": "snapshotter.erofs.tree",
        "SourceTree": "snapshotter.erofs.tree",
        "Extent": "snapshotter.erofs.tree",
        "Chunks": "snapshotter.erofs.tree",
        "InlineTail": "snapshotter.erofs.tree",
        "Limits": "snapshotter.erofs.limits",
        "DEFAULT_LIMITS": "snapshotter.erofs.limits",
        "FormatError": "snapshotter.erofs.format",
        "SuperBlock": "snapshotter.erofs.format",
        "Inode": "snapshotter.erofs.format",
        "Dirent": "snapshotter.erofs.format",
        "DeviceSlot": "snapshotter.erofs.format",
        "ChunkIndex": "snapshotter.erofs.format",
        "XattrEntry": "snapshotter.erofs.format",
    },
    globals(),
)
