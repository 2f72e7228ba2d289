# The compiled scan's signature (snapshotter/fsmeta/_mergescan.c), for mypy.
import mmap
from typing import Any

_Fields = tuple[int, int, int, int, int, int, int, int, int, int, int]

def scan_dir(
    files: tuple[type, type, dict[bytes, bytes], tuple[str], int, int] | None,
    image: mmap.mmap | bytes,
    data: bytes,
    block_size: int,
    meta_base: int,
    build_time: int,
    build_time_nsec: int,
    /,
) -> list[tuple[bytes, int, _Fields | Any]] | None: ...
