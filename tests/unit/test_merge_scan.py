"""The merge's compiled directory scan (fsmeta/_mergescan.c) and the pure-Python path give the
same entries and inode fields, the same merged bytes, and the same error for a damaged
layer; `EROFS_PASSTHROUGH_PURE=1` switches the compiled scan off."""

from __future__ import annotations

import functools
import random
import stat
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shim_integration.testbed.oci_archive import Entry
from snapshotter.erofs.reader import ErofsImage
from snapshotter.errors import EpError
from snapshotter.fsmeta import merge
from snapshotter.fsmeta.merge import merge_layers
from snapshotter.ingest.convert import DEFAULT_INLINE_MAX, convert_layer
from tests.support.layers import IMAGE_LAYERS, awkward_entries, build_layers, write_tar


def _scan():
    """The compiled scan; a missing build is a failure here (.ci/setup builds it)."""
    try:
        from snapshotter.fsmeta._mergescan import scan_dir
    except ImportError as exc:
        pytest.fail(f"the merge accelerator is not built ({exc}): run .ci/setup")
    return functools.partial(scan_dir, None)


def _wide_dir_entries() -> list[Entry]:
    """Directories of many blocks, names up to 255 bytes, extended inodes (wide owners)."""
    entries = [Entry("./", "dir"), Entry("wide", "dir")]
    entries += [Entry(f"wide/{i:05d}-" + "n" * (i % 240), data=b"w") for i in range(700)]
    entries += [Entry(f"wide/o{i}", data=b"o", uid=70000 + i) for i in range(5)]
    return entries


@pytest.fixture(scope="module")
def layers(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    tmp = tmp_path_factory.mktemp("scan")
    paths = build_layers(tmp, [*IMAGE_LAYERS, awkward_entries(), _wide_dir_entries()])
    # And one with small files inline (the default) next to one without.
    tar = write_tar(tmp / "plain.tar", IMAGE_LAYERS[0])
    convert_layer(tar, tmp / "plain.erofs", inline_max=0)
    return [*paths, tmp / "plain.erofs"]


def _both(img: ErofsImage, nid: int) -> object:
    """entries_fields of directory `nid` both ways: the result, or the error's text."""
    out = []
    for scan in (_scan(), None):
        try:
            out.append(img.entries_fields(img.inode(nid), scan))
        except EpError as exc:
            out.append(f"{type(exc).__name__}: {exc}")
    assert out[0] == out[1]
    return out[0]


def test_scan_gives_the_pure_entries_on_real_layers(layers: list[Path]) -> None:
    dirs = 0
    for path in layers:
        with ErofsImage(path) as img:
            for _path, info in img.walk():
                if stat.S_ISDIR(info.mode):
                    got = _both(img, info.nid)
                    assert isinstance(got, list)
                    want = [
                        (name, nid, img.inode_fields(nid))
                        for name, nid, _ in img.listdir(info)
                        if name not in (b".", b"..")
                    ]
                    assert got == want
                    dirs += 1
    assert dirs > 20


def test_scan_makes_the_nodes_the_pure_loop_makes(layers: list[Path]) -> None:
    """A layer's common files come as nodes, every attribute as the pure loop sets it."""
    from snapshotter.erofs.tree import Node

    assert merge._NODE_SPEC is not None, "Node or PackedChunks changed: update _node_spec"
    scan = _scan().func
    made = 0
    for path in layers:
        with ErofsImage(path) as img:
            spec = (*merge._NODE_SPEC, 3, img.sb.blocks)
            for _path, info in img.walk():
                if not stat.S_ISDIR(info.mode):
                    continue
                data = img.read(info)
                args = (data, 4096, img.sb.meta_blkaddr * 4096, img.sb.build_time)
                got = scan(spec, img._map, *args, img.sb.build_time_nsec)
                for name, nid, fields in img.entries_fields(info, None):
                    entry = got.pop(0)
                    assert entry[:2] == (name, nid)
                    if type(entry[2]) is not Node:
                        assert entry[2] == fields
                        continue
                    made += 1
                    node = entry[2]
                    _pos, fw, icount, mode, _nl, size, i_u, uid, gid, mtime, nsec = fields
                    assert (fw & 0xE, icount, mode & 0o170000) == (0, 0, 0o100000)
                    want = Node(
                        mode,
                        uid,
                        gid,
                        mtime,
                        nsec,
                        size,
                        merge.PackedChunks(
                            (-(-size // 4096) - 1).bit_length(),
                            merge._CHUNK_INDEX.pack(0, 3, i_u),
                        ),
                        xattrs=merge._EMPTY_XATTRS,
                    )
                    for f in Node.__dataclass_fields__:
                        assert getattr(node, f) == getattr(want, f), f
                    assert node.xattrs is merge._EMPTY_XATTRS
                assert got == []
    assert made > 10


def _merge_both(paths: list[Path], out: Path, monkeypatch: pytest.MonkeyPatch) -> bytes:
    """The merge with the compiled scan (whatever EROFS_PASSTHROUGH_PURE says) and without."""
    for scan, name in ((_scan().func, "c.fsmeta"), (None, "p.fsmeta")):
        with monkeypatch.context() as m:
            m.setattr(merge, "SCAN", scan)
            merge_layers(paths, out / name)
    compiled = (out / "c.fsmeta").read_bytes()
    assert compiled == (out / "p.fsmeta").read_bytes()
    return compiled


def test_merged_bytes_are_the_same_both_ways(
    layers: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _merge_both(layers, tmp_path, monkeypatch)
    whole = _merge_both(layers[:3], tmp_path, monkeypatch)
    # Continuing from a parent's fsmeta reads it with the same scan (its common files made
    # as nodes by the scan too), or without it: the same bytes.
    merge_layers(layers[:2], tmp_path / "parent.fsmeta")
    for scan in (_scan().func, None):
        monkeypatch.setattr(merge, "SCAN", scan)
        merge_layers(layers[:3], tmp_path / "cont.fsmeta", parent=tmp_path / "parent.fsmeta")
        assert (tmp_path / "cont.fsmeta").read_bytes() == whole
    # ... and the parent's tree itself is read the same both ways.
    with ErofsImage(tmp_path / "parent.fsmeta") as img:
        trees = []
        for scan in (_scan().func, None):
            monkeypatch.setattr(merge, "SCAN", scan)
            trees.append(_shape(merge._FsmetaReader(img, 2).tree()))
    assert trees[0] == trees[1]
    assert "PackedChunks" in repr(trees[0])


def test_read_whole_and_mapped_images_merge_alike(
    layers: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A small image is read whole (one pread), a larger one mapped: either way the merge
    gives the same bytes, and a damaged image the same error."""
    from snapshotter.erofs import reader

    sizes = [p.stat().st_size for p in layers]
    assert min(sizes) <= reader.READ_WHOLE_MAX  # both kinds occur in a default merge
    outs, errors = [], []
    truncated = tmp_path / "truncated.erofs"
    with ErofsImage(layers[0]) as img:
        image_bytes = img.sb.blocks * img.block_size
    truncated.write_bytes(layers[0].read_bytes()[: image_bytes - 4096])
    for limit in (0, 1 << 40):
        monkeypatch.setattr(reader, "READ_WHOLE_MAX", limit)
        with ErofsImage(layers[0]) as img:
            assert isinstance(img._map, bytes) == bool(limit)
            assert img.file_size == sizes[0]
        merge_layers(layers, tmp_path / f"{limit}.fsmeta")
        outs.append((tmp_path / f"{limit}.fsmeta").read_bytes())
        with pytest.raises(EpError) as exc:
            merge_layers([*layers[:1], truncated], tmp_path / "t.fsmeta")
        errors.append(str(exc.value))
    assert outs[0] == outs[1]
    assert errors[0] == errors[1] and "truncated" in errors[0]


def _shape(node: object) -> object:
    """A tree as nested tuples of every attribute (Nodes compare by identity)."""
    from snapshotter.erofs.tree import Node

    assert isinstance(node, Node)
    attrs = tuple((f, getattr(node, f)) for f in Node.__dataclass_fields__ if f != "children")
    if node.children is None:
        return attrs
    return attrs, tuple((k, _shape(v)) for k, v in sorted(node.children.items()))


_NAMES = st.sampled_from(["a", "b", "c", "dd", "e" * 40, "f" * 200, "g.1", "h-2"])


@st.composite
def _layer_specs(draw: st.DrawFn) -> list[list[Entry]]:
    """Two to four layers over the same few paths: files, dirs, symlinks, whiteouts,
    opaque dirs, hardlinks, owners that need extended inodes."""
    specs = []
    for _ in range(draw(st.integers(2, 4))):
        entries = [Entry("./", "dir")]
        files: list[str] = []
        for top in draw(st.lists(_NAMES, min_size=1, max_size=4, unique=True)):
            entries.append(Entry(top, "dir", uid=draw(st.sampled_from([0, 7, 70000]))))
            if draw(st.booleans()):
                entries.append(Entry(f"{top}/.wh..wh..opq"))
            for name in draw(st.lists(_NAMES, max_size=6, unique=True)):
                kind = draw(st.sampled_from(["file", "file", "symlink", "whiteout", "dir"]))
                path = f"{top}/{name}"
                if kind == "whiteout":
                    entries.append(Entry(f"{top}/.wh.{name}"))
                elif kind == "symlink":
                    entries.append(Entry(path, "symlink", link="../" + name))
                elif kind == "dir":
                    entries.append(Entry(path, "dir", mtime=draw(st.sampled_from([1, 2]))))
                else:
                    size = draw(st.sampled_from([0, 1, 100, 4096, 5000]))
                    entries.append(Entry(path, data=random.Random(size).randbytes(size)))
                    files.append(path)
            count = draw(st.integers(0, 300))  # a directory over several blocks
            entries += [Entry(f"{top}/many{i:04d}", data=b"m") for i in range(count)]
        if files and draw(st.booleans()):
            entries.append(Entry("link", "hardlink", link=files[0]))
        specs.append(entries)
    return specs


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(specs=_layer_specs(), inline=st.booleans())
def test_generated_layers_merge_to_the_same_bytes_both_ways(
    specs: list[list[Entry]], inline: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = Path(tempfile.mkdtemp(dir=tmp_path))  # one per example (hypothesis replays some)
    paths = []
    for i, entries in enumerate(specs):
        tar = write_tar(work / f"l{i}.tar", entries)
        convert_layer(tar, work / f"l{i}.erofs", inline_max=DEFAULT_INLINE_MAX if inline else 0)
        paths.append(work / f"l{i}.erofs")
    _merge_both(paths, work, monkeypatch)


@settings(max_examples=150, deadline=None)
@given(
    which=st.integers(0, 100),
    damage=st.lists(st.tuples(st.integers(0, 2**31), st.integers(0, 255)), min_size=1, max_size=6),
)
def test_damaged_layers_give_the_same_error_both_ways(
    layers: list[Path], tmp_path_factory: pytest.TempPathFactory, which: int, damage: list
) -> None:
    """Bytes of the metadata (the inode table and the directory blocks) overwritten: the
    compiled scan returns what the pure path returns, or the pure path's error."""
    good = layers[which % len(layers)].read_bytes()
    with ErofsImage(layers[which % len(layers)]) as img:
        start = img.sb.meta_blkaddr * img.block_size
        end = img.sb.blocks * img.block_size
    raw = bytearray(good)
    for where, value in damage:
        raw[start + where % (end - start)] = value
    path = tmp_path_factory.mktemp("damaged") / "d.erofs"
    path.write_bytes(raw)
    try:
        img = ErofsImage(path)
    except EpError:
        return
    with img:
        todo, seen = [img.root_nid], set()
        while todo and len(seen) < 200:
            nid = todo.pop()
            if nid in seen:
                continue
            seen.add(nid)
            try:
                if not stat.S_ISDIR(img.inode(nid).mode):
                    continue
            except EpError:
                continue
            got = _both(img, nid)
            if isinstance(got, list):
                todo += [child for _name, child, fields in got if stat.S_ISDIR(fields[3])]


def test_scan_bounds_every_read() -> None:
    """Inode addresses past the image, or so large the address overflows, and directory
    bytes that end inside a dirent: None (the pure path then says why), never a read."""
    scan = _scan()
    block = bytearray(64)
    block[0:8] = (2**64 - 1).to_bytes(8, "little")  # nid: far past anything
    block[8:10] = (12).to_bytes(2, "little")
    block[12:13] = b"x"
    assert scan(b"\0" * 4096, bytes(block[:13]), 4096, 0, 0, 0) is None
    block[0:8] = (128).to_bytes(8, "little")  # 4096 + 0: just past a 4096-byte image
    assert scan(b"\0" * 4096, bytes(block[:13]), 4096, 0, 0, 0) is None
    assert scan(b"\0" * 4096, bytes(block[:13]), 4096, 2**64 - 1, 0, 0) is None
    assert scan(b"\0" * 4096, bytes(block[:10]), 4096, 0, 0, 0) is None
    assert scan(b"\0" * 4096, b"", 4096, 0, 0, 0) == []
    one = scan(b"\0" * 4096 * 2, bytes(block[:13]), 4096, 0, 5, 6)
    assert one == [(b"x", 128, (4096, 0, 0, 0, 0, 0, 0, 0, 0, 5, 6))]
