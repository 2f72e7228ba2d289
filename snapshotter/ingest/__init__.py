"""Layer ingestion: tar stream, decompression, tar/directory/native import, conversion.

`convert_layer` is the entry point (a tar, tar.gz or tar.zst layer to an EROFS blob with its
dm-verity tree); the names below are imported from their modules on first use, so importing
the package loads no compressor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from snapshotter.lazy_exports import lazy_exports

if TYPE_CHECKING:
    from snapshotter.ingest.convert import (
        ConvertResult,
        convert_directory,
        convert_layer,
        import_erofs_image,
    )
    from snapshotter.ingest.streams import (
        ByteReader,
        LayerStream,
    )
    from snapshotter.ingest.validate import (
        InvalidLayer,
        LayerCheck,
        validate_layer,
    )

__all__ = [
    "convert_layer",
    "convert_directory",
    "import_erofs_image",
    "ConvertResult",
    "validate_layer",
    "InvalidLayer",
    "LayerCheck",
    "LayerStream",
    "ByteReader",
]

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "convert_layer": "snapshotter.ingest.convert",
        "convert_directory": "snapshotter.ingest.convert",
        "import_erofs_image": "snapshotter.ingest.convert",
        "ConvertResult": "snapshotter.ingest.convert",
        "validate_layer": "snapshotter.ingest.validate",
        "InvalidLayer": "snapshotter.ingest.validate",
        "LayerCheck": "snapshotter.ingest.validate",
        "LayerStream": "snapshotter.ingest.streams",
        "ByteReader": "snapshotter.ingest.streams",
    },
    globals(),
)
