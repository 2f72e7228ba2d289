"""The layer data path: LayerStream's producer thread, DataWriter's pieces, VerityFeed's thread.

What a user relies on: the tar bytes and both digests come out exactly as the layer holds
them whatever the compression and however the reader asks for them; an error in a thread is
the same one EpError, raised where the stream reaches it; no thread outlives a conversion;
the image bytes do not depend on how the data was cut into pieces, nor on threads.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import tarfile
import tempfile
import threading

import pytest
import zstandard
from isal import isal_zlib

from snapshotter.erofs.image_verity import VerityFeed, verity_builder
from snapshotter.erofs.limits import Limits
from snapshotter.erofs.tree import Chunks, Extent
from snapshotter.erofs.writer import DataWriter
from snapshotter.errors import EpError, InvalidInput
from snapshotter.ingest.streams import OUT_LIMIT, LayerStream, _Zstd


def _payload(size: int = 3 << 20, seed: int = 1) -> bytes:
    """Bytes of mixed compressibility: random runs, zero runs, text."""
    rng = random.Random(seed)
    parts = []
    while sum(map(len, parts)) < size:
        kind = rng.randrange(3)
        n = rng.randrange(1, 200_000)
        parts.append(rng.randbytes(n) if kind == 0 else bytes(n) if kind == 1 else b"ab\n" * n)
    return b"".join(parts)[:size]


def _gzip(data: bytes, members: int = 3) -> bytes:
    step = -(-len(data) // members)
    return b"".join(
        isal_zlib.compress(data[i : i + step], 1, 31) for i in range(0, len(data), step)
    )


def _zstd(data: bytes) -> bytes:
    half = len(data) // 2
    c = zstandard.ZstdCompressor()
    return c.compress(data[:half]) + bytes(100) + c.compress(data[half:])  # zero padding between


def _stream_threads() -> list[threading.Thread]:
    return [
        t
        for t in threading.enumerate()
        if t.name in ("layer-stream", "layer-diffid", "verity-feed")
    ]


@pytest.mark.parametrize("kind", ["none", "gzip", "zstd"])
def test_every_read_style_gives_the_tar_and_its_digests(kind: str) -> None:
    tar = _payload()
    blob = {"none": tar, "gzip": _gzip(tar), "zstd": _zstd(tar)}[kind]
    rng = random.Random(7)
    got = bytearray()
    with LayerStream(io.BytesIO(blob)) as stream:
        assert stream.compression == kind
        while True:
            how = rng.randrange(3)
            n = rng.choice([1, 511, 512, 4096, 70_000, 1 << 20, 5 << 20])
            if how == 0:
                piece = stream.read(n)
                assert len(piece) == n or len(got) + len(piece) == len(tar)
            elif how == 1:
                piece = stream.read_some(n)
                assert 0 < len(piece) <= n or len(got) == len(tar)
            else:
                start = len(got)
                skipped = stream.skip(n)
                piece = tar[start : start + skipped]  # skipped bytes are still hashed
            if not piece:
                break
            got += piece
        assert stream.drain() == 0
        assert bytes(got) == tar
        assert stream.diff_id == "sha256:" + hashlib.sha256(tar).hexdigest()
        assert stream.compressed_digest == "sha256:" + hashlib.sha256(blob).hexdigest()
    assert not _stream_threads()


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_without_the_source_digest_the_tar_and_diff_id_are_the_same(kind: str) -> None:
    tar = _payload()
    blob = {"gzip": _gzip(tar), "zstd": _zstd(tar)}[kind]
    with LayerStream(io.BytesIO(blob), source_digest=False) as stream:
        got = bytes(stream.read())
        assert stream.drain() == 0
    assert got == tar
    assert stream.diff_id == "sha256:" + hashlib.sha256(tar).hexdigest()
    assert stream.compressed_digest is None
    assert not _stream_threads()


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_a_truncated_stream_is_one_error_after_its_data(kind: str) -> None:
    tar = _payload(1 << 20)
    blob = {"gzip": _gzip(tar, 1), "zstd": zstandard.ZstdCompressor().compress(tar)}[kind]
    stream = LayerStream(io.BytesIO(blob[: len(blob) - 64]))
    with stream, pytest.raises(InvalidInput, match=f"truncated {kind}"):
        stream.drain()
    assert not _stream_threads()


class _FailingSource:
    """A source that gives `good` bytes, then fails as a broken disk or socket would."""

    def __init__(self, good: bytes) -> None:
        self._data = io.BytesIO(good)

    def read(self, size: int = -1) -> bytes:
        data = self._data.read(size)
        if not data:
            raise OSError(5, "Input/output error")
        return data


def test_a_source_error_arrives_where_the_stream_reaches_it() -> None:
    tar = _payload(3 << 20)
    with LayerStream(_FailingSource(tar)) as stream:
        assert bytes(stream.read(len(tar))) == tar  # every good byte first
        with pytest.raises(OSError, match="Input/output error"):
            stream.read(1)
    assert not _stream_threads()


def test_a_bomb_stops_at_the_limit() -> None:
    blob = zstandard.ZstdCompressor().compress(bytes(64 << 20))
    stream = LayerStream(io.BytesIO(blob), Limits(max_tar_bytes=8 << 20))
    with stream, pytest.raises(InvalidInput, match="max_tar_bytes"):
        stream.drain()
    assert not _stream_threads()


def test_closing_early_stops_a_producer_that_waits_for_room() -> None:
    blob = _gzip(_payload(32 << 20, seed=3), 8)  # far more than the queue holds
    stream = LayerStream(io.BytesIO(blob))
    stream.read(1000)
    stream.close()
    assert not _stream_threads()


def test_closing_early_stops_the_digests_thread_too() -> None:
    """Compressed layers hash in a thread of their own: started while the stream runs,
    stopped by close() however far the stream got."""
    blob = _gzip(_payload(32 << 20, seed=4), 4)
    stream = LayerStream(io.BytesIO(blob))
    stream.read(1000)
    assert any(t.name == "layer-diffid" for t in threading.enumerate())
    stream.close()
    assert not _stream_threads()


def _decode_zstd(blob: bytes, step: int) -> tuple[bytes, int, int]:
    """`blob` through the zstd decoder in input pieces of `step` bytes: the output, the
    largest output chunk and the number of chunks."""
    out, largest, calls = bytearray(), 0, 0
    for piece in _Zstd().decode(blob[pos : pos + step] for pos in range(0, len(blob), step)):
        calls += 1
        out += piece
        largest = max(largest, len(piece))
    return bytes(out), largest, calls


def _skippable(content: bytes) -> bytes:
    return b"\x5a\x2a\x4d\x18" + len(content).to_bytes(4, "little") + content


def test_zstd_frames_of_every_kind_decode_whatever_the_input_pieces() -> None:
    """The decoder cuts its input at block boundaries it reads from the headers: frames with
    and without checksums and content sizes, raw (incompressible), RLE and compressed
    blocks, empty frames, skippable frames and zero padding, in pieces of any size."""
    data = _payload(2 << 20, seed=4)
    rng = random.Random(11)
    frames = [
        zstandard.ZstdCompressor(level=3, write_checksum=True).compress(data[: 1 << 20]),
        bytes(5),
        _skippable(b"metadata"),
        zstandard.ZstdCompressor(write_content_size=False).compress(rng.randbytes(300_000)),
        zstandard.ZstdCompressor().compress(b""),
        zstandard.ZstdCompressor(level=1).compress(bytes(3 << 20)),  # RLE-like, ~1000:1
        zstandard.ZstdCompressor(level=19, write_checksum=True).compress(data[1 << 20 :]),
        _skippable(b""),
        zstandard.ZstdCompressor().compress(b"x" * 100),  # single segment, 1-byte size
        bytes(4096 + 3),
    ]
    blob = b"".join(frames)
    want = (
        data[: 1 << 20]
        + b"".join(zstandard.ZstdDecompressor().decompressobj().decompress(f) for f in frames[3:6])
        + data[1 << 20 :]
        + b"x" * 100
    )
    for step in (1, 3, 4093, 65_536, 1 << 20, len(blob)):
        if step == 1:  # byte by byte: a prefix, which ends inside a frame
            got = bytearray()
            with pytest.raises(InvalidInput, match="truncated zstd data"):
                for piece in _Zstd().decode(blob[i : i + 1] for i in range(200_000)):
                    got += piece
            assert want.startswith(got) and len(got) > 100_000
            continue
        got, largest, calls = _decode_zstd(blob, step)
        assert got == want
        assert largest <= OUT_LIMIT
    _, _, calls = _decode_zstd(blob, 1 << 20)
    assert calls < 40  # a few chunks per MiB of output, not one per block


def _rle_bomb(blocks: int) -> bytes:
    """A zstd frame of `blocks` RLE blocks of 128 KiB each: 4 bytes of input per 128 KiB."""
    header = (128 << 10) << 3 | 1 << 1  # block size, type RLE, not the last
    block = header.to_bytes(3, "little") + b"\0"
    last = (header | 1).to_bytes(3, "little") + b"\0"
    return (
        zstandard.MAGIC_NUMBER.to_bytes(4, "little")
        + bytes([0, 0x38])
        + block * (blocks - 1)
        + last
    )  # descriptor: no content size; window 2^17


def test_a_zstd_bomb_of_rle_blocks_comes_out_in_bounded_calls() -> None:
    small = _rle_bomb(40)
    assert _decode_zstd(small, len(small))[0] == bytes(40 << 17)  # what zstd makes of it
    bomb = _rle_bomb(1 << 18)  # 1 MiB of input, 32 GiB of output
    chunks = _Zstd().decode(iter([bomb]))
    assert len(next(chunks)) == len(next(chunks)) == OUT_LIMIT  # one chunk at a time
    chunks.close()
    blob = zstandard.MAGIC_NUMBER.to_bytes(4, "little") + bytes([0, 0x38]) + bomb[6:]
    stream = LayerStream(io.BytesIO(blob), Limits(max_tar_bytes=64 << 20))
    with stream, pytest.raises(InvalidInput, match="max_tar_bytes"):
        stream.drain()


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (_rle_bomb(2)[:-4] + b"\x07\0\0\0", "corrupt zstd data"),  # block type 3: reserved
        (_rle_bomb(2) + b"garbage!", "corrupt zstd data"),  # not a frame after a frame
        (_rle_bomb(2)[:8], "truncated zstd data"),  # inside a block header
        (_rle_bomb(2) + zstandard.MAGIC_NUMBER.to_bytes(4, "little"), "truncated zstd"),
    ],
)
def test_a_bad_zstd_structure_is_one_error(blob: bytes, message: str) -> None:
    with LayerStream(io.BytesIO(blob)) as stream, pytest.raises(InvalidInput, match=message):
        stream.drain()
    assert not _stream_threads()


def _write(pieces_of: int | None, data: bytes, hole_chunk: int = 64 << 10) -> tuple[bytes, object]:
    """Write `data` as one file through a DataWriter whose `read` returns pieces of at most
    `pieces_of` bytes (None: exactly what is asked); the image bytes and the file's layout."""
    rng = random.Random(pieces_of)
    view = memoryview(data)
    pos = 0

    def read(n: int) -> memoryview:
        nonlocal pos
        if pieces_of is not None:
            n = min(n, rng.randrange(1, pieces_of + 1))
        piece = view[pos : pos + n]
        pos += len(piece)
        return piece

    with tempfile.TemporaryFile() as f:
        writer = DataWriter(f.fileno(), 4096, 1, hole_chunk=hole_chunk)
        layout = writer.add_file(read, len(data))
        writer.add_blocks(b"end")
        writer.flush()
        return os.pread(f.fileno(), 64 << 20, 0), layout


@pytest.mark.parametrize("pieces_of", [1000, 4096, 65_537, 300_000])
def test_image_bytes_do_not_depend_on_how_data_is_cut(pieces_of: int) -> None:
    rng = random.Random(5)
    chunk = 64 << 10
    data = b"".join(  # chunks of zeros (holes), of data, and of zeros with data at the ends
        bytes(chunk)
        if k == 0
        else rng.randbytes(chunk)
        if k == 1
        else b"\0" * 10 + b"x" + bytes(chunk - 12) + b"y"
        for k in (rng.randrange(3) for _ in range(40))
    ) + rng.randbytes(1234)
    whole, layout = _write(None, data)
    assert isinstance(layout, Chunks)  # the zero chunks became holes
    assert _write(pieces_of, data) == (whole, layout)


def test_a_file_without_holes_is_one_extent_and_a_short_read_is_an_error() -> None:
    data = random.Random(2).randbytes(300_001)
    image, layout = _write(5000, data)
    assert isinstance(layout, Extent)
    assert image[4096 : 4096 + len(data)] == data
    with tempfile.TemporaryFile() as f:
        writer = DataWriter(f.fileno(), 4096, 1)
        with pytest.raises(EpError, match="unexpected end of data"):
            writer.add_file(io.BytesIO(data[:1000]).read, len(data))


def test_threaded_verity_feed_gives_the_same_root_and_stops() -> None:
    data = _payload(8 << 20, seed=9)
    roots = []
    for threaded in (False, True):
        builder, params = verity_builder(True, b"salt" * 8)
        feed = VerityFeed(builder, params.data_block_size, 0, threaded=threaded)
        for pos in range(0, len(data), 100_000):  # pieces across block boundaries
            feed.observe(pos, data[pos : pos + 100_000])
        with tempfile.TemporaryFile() as f:
            f.write(data)
            end = feed.finish(f.fileno())
            roots.append(builder.finish(end // params.data_block_size, f, end).root_hash)
    assert roots[0] == roots[1]
    assert not _stream_threads()


def test_an_error_in_the_verity_thread_is_raised_by_the_writer() -> None:
    builder, params = verity_builder(True, b"salt" * 8)
    feed = VerityFeed(builder, params.data_block_size, 0)
    block = bytes(4096)
    feed.builder.hash_blocks(0, block)  # block 0 hashed already: the thread's turn fails
    feed.observe(0, block)
    with tempfile.TemporaryFile() as f, pytest.raises(EpError):
        feed.finish(f.fileno())
    feed.close()
    assert not _stream_threads()


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_header_fast_path_reads_what_the_general_parser_reads(fmt: int) -> None:
    """Headers as writers write them take one regex; the numbers must be the general
    parser's, device numbers and an all-NUL field included, and a bad checksum still fails."""
    from snapshotter.ingest.tarstream import _FAST_NUMBERS, TarHeader

    members = []
    for kind, dev in ((tarfile.REGTYPE, (0, 0)), (tarfile.CHRTYPE, (4095, 1 << 19))):
        info = tarfile.TarInfo("d/f")
        info.type, info.mode, info.uid, info.gid = kind, 0o4755, 1000, 65534
        info.mtime, info.size = 1_700_000_000, 0 if kind == tarfile.CHRTYPE else 12345
        info.devmajor, info.devminor = dev
        members.append(info.tobuf(fmt, "utf-8", "surrogateescape")[-512:])
    for block in members:
        assert _FAST_NUMBERS.match(block, 100, 156)
        header = TarHeader.unpack(block)
        general = TarHeader._numbers(block)
        fields = (header.mode, header.uid, header.gid, header.size, header.mtime)
        assert (*fields, header.devmajor, header.devminor) == general[:7]
        corrupt = bytearray(block)
        corrupt[0] ^= 1
        with pytest.raises(InvalidInput, match="checksum"):
            TarHeader.unpack(bytes(corrupt))
