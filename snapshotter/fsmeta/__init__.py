"""The fsmeta: an image's layers merged into one metadata-only EROFS (or one flat device).

The names below are imported from `snapshotter.fsmeta.merge` (the merge) and
`snapshotter.fsmeta.devices` (the VM device list, `fsmeta.json`) on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from snapshotter.lazy_exports import lazy_exports

if TYPE_CHECKING:
    from snapshotter.fsmeta.devices import (
        ChainDescription,
        ChainDevice,
        decode_description_option,
        encode_description_option,
        read_description,
        read_mounted_description,
    )
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
    "ChainDescription",
    "ChainDevice",
    "read_description",
    "read_mounted_description",
    "encode_description_option",
    "decode_description_option",
]

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "merge_layers": "snapshotter.fsmeta.merge",
        "MergeResult": "snapshotter.fsmeta.merge",
        "LayerBlob": "snapshotter.fsmeta.merge",
        "MergedDevice": "snapshotter.fsmeta.merge",
        "appended_tree_size": "snapshotter.fsmeta.merge",
        "ChainDescription": "snapshotter.fsmeta.devices",
        "ChainDevice": "snapshotter.fsmeta.devices",
        "read_description": "snapshotter.fsmeta.devices",
        "read_mounted_description": "snapshotter.fsmeta.devices",
        "encode_description_option": "snapshotter.fsmeta.devices",
        "decode_description_option": "snapshotter.fsmeta.devices",
    },
    globals(),
)
