# The compiled scan's signature (snapshotter/fsmeta/_mergescan.c), for mypy.
import mmap

_Fields = tuple[int, int, int, int, int, int, int, int, int, int, int]

def scan_dir(
    image: mmap.mmap | bytes,
    data: bytes,
    block_size: int,
    meta_base: int,
    build_time: int,
    build_time_nsec: int,
    /,
) -> list[tuple[bytes, int, _Fields]] | None: ...
