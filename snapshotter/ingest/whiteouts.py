"""The OCI layer whiteout names (image-spec layer.md, the AUFS convention), declared once.

`.wh.NAME` in a directory deletes NAME of the layers below; `.wh..wh..opq` makes its directory
opaque (nothing below shows through). Other `.wh..wh.` names are AUFS bookkeeping (hard-link
stores) that no image contains as content. Tar names are bytes where layers are read
(`tar_import`); `whiteout_of` and `OPAQUE_ENTRY` spell them for code that writes layers.
"""

from __future__ import annotations

__all__ = ["AUFS_META_PREFIX", "OPAQUE_ENTRY", "OPAQUE_MARKER", "WHITEOUT_PREFIX", "whiteout_of"]

WHITEOUT_PREFIX = b".wh."
AUFS_META_PREFIX = WHITEOUT_PREFIX + WHITEOUT_PREFIX
OPAQUE_MARKER = AUFS_META_PREFIX + b".opq"
OPAQUE_ENTRY = OPAQUE_MARKER.decode()


def whiteout_of(name: str) -> str:
    """The entry that deletes NAME (a file or directory of the layers below)."""
    return WHITEOUT_PREFIX.decode() + name
