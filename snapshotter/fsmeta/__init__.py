"""The fsmeta: an image's layers merged into one metadata-only EROFS (or one flat device).

The names below are imported from `snapshotter.fsmeta.merge` on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from snapshotter.lazy_exports import lazy_exports

if TYPE_CHECKING:
    from snapshotter.fsmeta.merge import (
        LayerBlob,
        MergedDevice,
        MergeResult,
        appended_tree_size,
        merge_layers,
    )

__all__ = [
    "merge_layers",
    "MergeResult",
    "LayerBlob",
    "MergedDevice",
    "appended_tree_size",
]

__getattr__, __dir__ = lazy_exports(__name__, {
    "merge_layers": "snapshotter.fsmeta.merge",
    "MergeResult": "snapshotter.fsmeta.merge",
    "LayerBlob": "snapshotter.fsmeta.merge",
    "MergedDevice": "snapshotter.fsmeta.merge",
    "appended_tree_size": "snapshotter.fsmeta.merge",
}, globals())
