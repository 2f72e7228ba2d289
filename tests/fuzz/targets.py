"""Fuzz targets: a real input (a tar, an EROFS image from our writer) damaged at the places
that matter, fed to the code that reads untrusted input. A target may end in success or in an
EpError, never in anything else (a traceback), a hang or unbounded memory.

A damage is a list of (offset, bytes) writes, so an example is plain data: the ones that once
broke something are kept as JSON in tests/fuzz/examples/ and replayed by the test suite
(`tests/kernel/test_erofs_hostile_images.py`), whatever Hypothesis version generates new ones. The
CI test and `make fuzz` (tests/fuzz/__main__.py) generate with fixed seeds.
"""

from __future__ import annotations

import hashlib
import io
import json
import signal
import stat
import tarfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from hypothesis import strategies as st

from snapshotter.erofs.format import SUPER_OFFSET
from snapshotter.erofs.reader import ErofsImage
from snapshotter.errors import EpError
from snapshotter.fsmeta.merge import merge_layers
from snapshotter.ingest.convert import convert_layer, import_erofs_image
from tests.support.layers import awkward_entries, write_tar

EXAMPLES = Path(__file__).parent / "examples"
Damage = list[tuple[int, bytes]]

# Values that break size and address arithmetic, written as 1, 2, 4 or 8 bytes.
INTERESTING = [
    0,
    1,
    2,
    0x7F,
    0x80,
    0xFF,
    0xFFFF,
    0xFFFFFFFF,
    0xFFFFFFF0,
    1 << 31,
    1 << 40,
    (1 << 60) + 4097,
    (1 << 63) - 1,
    (1 << 64) - 1,
]
# Inode fields (offset in the inode, width): format, xattr count, mode, size, layout word.
INODE_FIELDS = [(0, 2), (2, 2), (4, 2), (8, 4), (16, 4)]
EXTENDED_INODE_FIELDS = [(0, 2), (2, 2), (4, 2), (8, 8), (16, 4), (44, 4)]
# Tar header fields (offset in the 512-byte header, width): name, mode, uid, size, mtime,
# checksum, type, link name, magic, device numbers, prefix.
TAR_FIELDS = [
    (0, 100),
    (100, 8),
    (108, 8),
    (124, 12),
    (136, 12),
    (148, 8),
    (156, 1),
    (157, 100),
    (257, 8),
    (329, 8),
    (337, 8),
    (345, 155),
]


class Hang(Exception):
    """One example ran past its time limit."""


@dataclass(frozen=True)
class HotSpots:
    """Where damage matters most: single bytes, and (offset, width) fields."""

    bytes: list[int]
    fields: list[tuple[int, int]]


@dataclass(frozen=True)
class Target:
    name: str
    base: Callable[[Path], bytes]  # the undamaged input, built in a work directory
    hot_spots: Callable[[bytes, Path], HotSpots]
    run: Callable[[bytes, Path], None]  # raises nothing for any input it handles right
    first: int = 0  # damage from this offset on (an EROFS image's first 1 KiB is unused)


def apply(base: bytes, damage: Damage) -> bytes:
    image = bytearray(base)
    for offset, raw in damage:
        image[offset : offset + len(raw)] = raw[: max(0, len(image) - offset)]
    return bytes(image)


def damages(spots: HotSpots, size: int, first: int = 0) -> st.SearchStrategy[Damage]:
    """1..8 writes: a field, or a byte or little-endian word at a hot spot or anywhere after
    `first`, each value random or one that breaks arithmetic."""
    anywhere = st.integers(first, size - 1)

    @st.composite
    def one(draw: st.DrawFn) -> tuple[int, bytes]:
        if spots.fields and draw(st.booleans()):
            where, width = draw(st.sampled_from(spots.fields))
        else:
            where = draw(
                st.one_of(st.sampled_from(spots.bytes), anywhere) if spots.bytes else anywhere
            )
            width = draw(st.sampled_from([1, 1, 2, 4, 8]))
        if width > 8:  # a text field: random bytes, or digits (tar numbers are octal text)
            raw = draw(
                st.one_of(
                    st.binary(min_size=1, max_size=width), st.from_regex(rb"\A[0-7 \x00-]{1,12}\Z")
                )
            )
            return where, raw
        value = draw(st.one_of(st.integers(0, (1 << 8 * width) - 1), st.sampled_from(INTERESTING)))
        return where, (value & ((1 << 8 * width) - 1)).to_bytes(width, "little")

    return st.lists(one(), min_size=1, max_size=8)


@contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    def expired(signum: int, frame: object) -> None:
        raise Hang(f"no result after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# -- EROFS ----------------------------------------------------------------------------------------


def _erofs_base(work: Path) -> bytes:
    out = work / "base.erofs"
    if not out.exists():
        convert_layer(write_tar(work / "base.tar", awkward_entries()), out)
    return out.read_bytes()


def _erofs_hot_spots(base: bytes, work: Path) -> HotSpots:
    """The superblock, every inode with its xattrs, the first entries of every directory
    block, every chunk table; and every inode's fields."""
    path = work / "spots.erofs"
    path.write_bytes(base)
    spots = set(range(SUPER_OFFSET, SUPER_OFFSET + 128))
    fields: set[tuple[int, int]] = set()
    with ErofsImage(path) as img:
        for _path, info in img.walk():
            spots.update(range(info.pos, info.data_pos))
            layout = EXTENDED_INODE_FIELDS if info.inode.extended else INODE_FIELDS
            fields.update((info.pos + off, width) for off, width in layout)
            if stat.S_ISDIR(info.mode):
                for ref in img.data_map(info):
                    start = (
                        ref.inline_pos
                        if ref.inline_pos is not None
                        else ref.blkaddr * img.block_size
                    )
                    spots.update(range(start, start + 48))
            if info.inode.layout == 4:  # chunk based: the table follows the inode
                spots.update(range(info.data_pos, info.data_pos + 64))
    return HotSpots(sorted(spots), sorted(fields))


def use_image(path: Path, work: Path) -> None:
    """What a user of an image does: merge it, then read every entry through our reader."""
    merge_layers([path], work / "m.fsmeta")
    read_image(path)


def read_image(path: Path) -> None:
    with ErofsImage(path) as img:
        for _path, info in img.walk():
            if stat.S_ISREG(info.mode):
                for _piece in zip(range(64), img.iter_data(info), strict=False):
                    pass  # the first 64 pieces: enough to reach every kind of extent
            elif stat.S_ISLNK(info.mode):
                img.readlink(info)
            img.xattrs(info)


def _erofs_import(image: bytes, work: Path) -> None:
    """A registry's native layer: imported (validated), then merged and read."""
    try:
        import_erofs_image(io.BytesIO(image), work / "stored.erofs")
    except EpError:
        return
    try:
        use_image(work / "stored.erofs", work)
    except EpError as exc:  # what passed the validation must merge and read
        raise AssertionError(f"a validated layer failed: {exc}") from None


def _erofs_merge(image: bytes, work: Path) -> None:
    """An image given to `merge` directly, never validated: the merge re-checks."""
    path = work / "direct.erofs"
    path.write_bytes(image)
    with suppress(EpError):
        use_image(path, work)


def _erofs_reader(image: bytes, work: Path) -> None:
    """`inspect` and every reader use on an unvalidated image."""
    path = work / "read.erofs"
    path.write_bytes(image)
    with suppress(EpError):
        read_image(path)


# -- tar ----------------------------------------------------------------------------------------


def _tar_base(work: Path) -> bytes:
    return write_tar(work / "base.tar", awkward_entries()).read_bytes()


def _tar_hot_spots(base: bytes, work: Path) -> HotSpots:
    """Every header's fields (PAX extended headers included)."""
    fields = []
    with tarfile.open(fileobj=io.BytesIO(base)) as tar:
        for member in tar:
            for header in range(member.offset, member.offset_data, 512):
                fields += [(header + off, width) for off, width in TAR_FIELDS]
    return HotSpots([], fields)


def _tar(data: bytes, work: Path) -> None:
    with suppress(EpError):
        convert_layer(io.BytesIO(data), work / "tar.erofs")


TARGETS = {
    t.name: t
    for t in (
        Target("erofs-import", _erofs_base, _erofs_hot_spots, _erofs_import, SUPER_OFFSET),
        Target("erofs-merge", _erofs_base, _erofs_hot_spots, _erofs_merge, SUPER_OFFSET),
        Target("erofs-reader", _erofs_base, _erofs_hot_spots, _erofs_reader, SUPER_OFFSET),
        Target("tar", _tar_base, _tar_hot_spots, _tar),
    )
}


# -- examples -------------------------------------------------------------------------------------


def save_example(target: str, damage: Damage, error: str, directory: Path = EXAMPLES) -> Path:
    """Keep a damage that broke something, named by its content, for the suite to replay."""
    record = {"target": target, "damage": [[off, raw.hex()] for off, raw in damage], "found": error}
    text = json.dumps(record, indent=1) + "\n"
    name = f"{target}-{hashlib.sha256(text.encode()).hexdigest()[:12]}.json"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text(text)
    return directory / name


def load_example(path: Path) -> tuple[Target, Damage]:
    record = json.loads(path.read_text())
    return TARGETS[record["target"]], [(off, bytes.fromhex(raw)) for off, raw in record["damage"]]


def committed_examples(prefix: str = "") -> list[Path]:
    return sorted(EXAMPLES.glob(f"{prefix}*.json"))
