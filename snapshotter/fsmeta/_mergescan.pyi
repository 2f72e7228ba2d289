# The compiled scan's signature (snapshotter/fsmeta/_mergescan.c), for mypy.
import mmap
from typing import Any

_Fields = tuple[int, int, int, int, int, int, int, int, int, int, int]

def scan_dir(
    # (Node, PackedChunks, slot names, other slots' values, PackedChunks' slot names,
    # device, image blocks[, fsmeta]): see merge.py `_node_spec`
    files: tuple[object, ...] | None,
    image: mmap.mmap | bytes,
    data: bytes,
    block_size: int,
    meta_base: int,
    build_time: int,
    build_time_nsec: int,
    /,
) -> list[tuple[bytes, int, _Fields | Any]] | None: ...
