"""The metadata writer's compiled loops (fsmeta/_mergepack.c, format.py `layout_inode_table`,
`pack_inode_table`, `pack_dir_blocks`, writer.py `_walk_tree`, `_dir_block_plan`, the
common file's columns) give the pure loops' bytes: whole images converted and merged both
ways are equal, and for anything the compiled loops do not expect they hand the work to the
pure loop, whose error it stays."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapshotter.erofs import format as fmt
from snapshotter.erofs import writer
from snapshotter.erofs.tree import Node
from snapshotter.fsmeta.merge import merge_layers
from snapshotter.ingest.convert import convert_layer
from tests.support.layers import IMAGE_LAYERS, awkward_entries, write_tar


def _loops():
    try:
        from snapshotter.fsmeta import _mergepack
    except ImportError as exc:
        pytest.fail(f"the writer's compiled loops are not built ({exc}): run .ci/setup")
    return _mergepack


def test_images_are_the_same_both_ways(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    specs = [*IMAGE_LAYERS, awkward_entries()]
    tars = [write_tar(tmp_path / f"l{i}.tar", entries) for i, entries in enumerate(specs)]
    outputs: dict[str, list[bytes]] = {}
    for way in ("compiled", "pure"):
        with monkeypatch.context() as m:  # compiled whatever EROFS_PASSTHROUGH_PURE says
            m.setattr(fmt, "_LOOPS", _loops() if way == "compiled" else None)
            m.setattr(writer, "WALK_TREE", _loops().walk_tree if way == "compiled" else None)
            m.setattr(
                writer, "DIR_BLOCK_PLAN", _loops().dir_block_plan if way == "compiled" else None
            )
            m.setattr(writer, "FILE_COLUMNS", _loops().file_columns if way == "compiled" else None)
            m.setattr(writer, "COMMON_MTIME", _loops().common_mtime if way == "compiled" else None)
            layers = []
            for i, tar in enumerate(tars):
                for inline in (True, False):
                    out = tmp_path / f"{way}-{i}-{inline}.erofs"
                    convert_layer(tar, out, **({} if inline else {"inline_max": 0}))
                    layers.append(out)
            merge_layers(layers, tmp_path / f"{way}.fsmeta", verity=True)
            outputs[way] = [p.read_bytes() for p in [*layers, tmp_path / f"{way}.fsmeta"]]
    assert outputs["compiled"] == outputs["pure"]


def _node(**kw: int) -> Node:
    return Node(**{"mode": 0o100644, "uid": 1, "gid": 2, "mtime": 3, "mtime_nsec": 4, **kw})


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    inodes=st.lists(
        st.tuples(
            st.sampled_from([32, 64, 32 + 12, 64 + 16, 40]),  # header bytes (with xattrs)
            st.integers(0, 4),  # layout
            st.sampled_from([0, 1, 0xFFFF, 0x10000, 2**32 - 1, 2**32]),  # nlink
            st.sampled_from([0, 5, 2**32 - 1, 2**32, 2**63]),  # size
            st.sampled_from([0, 7, 2**32 - 1, 2**32]),  # i_u
            st.sampled_from([0, 0xFFFF, 0x10000, 2**32 - 1, 2**32, -1]),  # uid
            st.sampled_from([-(2**63), -1, 0, 2**63 - 1, 2**63]),  # mtime
            st.sampled_from([None, b"", b"t", b"tail" * 30]),  # tail
            st.sampled_from([None, b"\1" * 8, b"\2" * 24]),  # chunk table
        ),
        max_size=12,
    ),
    bs=st.sampled_from([512, 4096]),
)
def test_inode_table_loops_agree(inodes: list, bs: int) -> None:
    """Arbitrary columns: the compiled layout gives the pure nids, the compiled packing the
    pure bytes, or it declines (False) exactly where the pure loop raises."""
    loops = _loops()
    heads = [i[0] for i in inodes]
    layouts = bytearray(i[1] for i in inodes)
    links = [i[2] for i in inodes]
    sizes = [i[3] for i in inodes]
    i_us = [i[4] for i in inodes]
    order = [_node(uid=i[5], gid=0, mtime=i[6]) for i in inodes]
    tails = {n: i[7] for n, i in enumerate(inodes) if i[7] is not None}
    tables = [i[8] for i in inodes]
    xbodies = {n: bytes(range(h % 32)) for n, h in enumerate(heads) if h % 32}
    chunk_tables = tables if any(t is not None for t in tables) else None
    base, meta_start = 0, bs
    want = fmt.layout_inode_table_pure(heads, chunk_tables, tails, meta_start, base, bs)
    assert loops.layout_inode_table(heads, chunk_tables, tails, meta_start, base, bs) == want
    nids, end = want
    args = (order, nids, heads, layouts, links, sizes, i_us, xbodies, chunk_tables, tails)
    pure = bytearray(end - meta_start)
    try:
        fmt.pack_inode_table_pure(pure, *args, base - meta_start)
    except struct.error:
        pure = None
    compiled = bytearray(end - meta_start)
    done = loops.pack_inode_table(compiled, *args, base - meta_start)
    if pure is None:
        assert not done
    if done:
        assert compiled == pure
    in_range = all(
        i[0] != 40 and i[5] >= 0 and abs(i[6]) < 2**63 and i[3] < 2**63 and i[4] < 2**32
        and (i[2] <= 0xFFFF or i[0] - (i[0] % 32) == 64) and i[2] < 2**32
        and (i[3] < 2**32 or i[0] - (i[0] % 32) == 64) and (i[5] <= 0xFFFF or i[0] >= 64)
        and i[5] < 2**32
        for i in inodes
    )  # fmt: skip
    if in_range:  # what a writer gives: the compiled loop does it all
        assert done


def test_inode_table_loop_packs_what_the_writer_gives() -> None:
    loops = _loops()
    order = [_node(), _node(uid=70000, mtime=-5), Node.directory()]
    heads, links, sizes, i_us = [32, 64 + 12, 32], [1, 2, 3], [5, 2**40, 30], [9, 10, 0]
    xbodies = {1: bytes(range(12))}
    tails = {2: b"t" * 30}
    nids, end = fmt.layout_inode_table_pure(heads, None, tails, 4096, 0, 4096)
    args = (order, nids, heads, bytearray([0, 4, 2]), links, sizes, i_us, xbodies, None, tails)
    pure, compiled = bytearray(end - 4096), bytearray(end - 4096)
    fmt.pack_inode_table_pure(pure, *args, -4096)
    assert loops.pack_inode_table(compiled, *args, -4096) is True
    assert compiled == pure


def test_dir_blocks_agree_and_decline_what_they_do_not_know() -> None:
    loops = _loops()
    children = {b"a": _node(), b"dir": Node.directory(), b"l": _node(mode=0o120777)}
    nid_of = {id(n): 40 + k for k, n in enumerate(children.values())}
    groups = [[b".", b"..", b"a"], [b"dir", b"l"]]
    want = fmt.pack_dir_blocks_pure(groups, children, nid_of, 1, 2)
    assert loops.pack_dir_blocks(groups, children, nid_of, 1, 2) == want
    assert fmt.pack_dir_blocks(groups, children, nid_of, 1, 2) == want
    assert loops.pack_dir_blocks([[b"missing"]], children, nid_of, 1, 2) is None
    with pytest.raises(KeyError):
        fmt.pack_dir_blocks([[b"missing"]], children, nid_of, 1, 2)
    assert loops.pack_dir_blocks([[b"a"]], children, {}, 1, 2) is None


@st.composite
def _trees(draw: st.DrawFn) -> Node:
    """Directories and files in any name order, files linked from several directories,
    empty directories, and now and then a directory that holds the root again (a cycle)."""
    root = Node.directory()
    dirs, files = [root], []
    for _ in range(draw(st.integers(0, 40))):
        parent = draw(st.sampled_from(dirs))
        name = draw(st.binary(min_size=1, max_size=3))
        kind = draw(st.sampled_from(["file", "file", "dir", "link"]))
        if kind == "dir":
            node = Node.directory()
            dirs.append(node)
        elif kind == "link" and files:
            node = draw(st.sampled_from(files))
        else:
            node = _node()
            files.append(node)
        parent.dir_children()[name] = node
    if draw(st.booleans()):
        draw(st.sampled_from(dirs)).dir_children()[b"loop"] = root
    return root


@settings(max_examples=300, deadline=None)
@given(root=_trees())
def test_tree_walks_agree(root: Node) -> None:
    order, links, parents = writer._walk_tree_pure(root)
    got = _loops().walk_tree(root)
    assert got is not None
    assert [id(n) for n in got[0]] == [id(n) for n in order]
    assert (got[1], got[2]) == (links, parents)


def test_tree_walk_declines_what_it_does_not_know() -> None:
    walk = _loops().walk_tree
    root = Node.directory()
    root.dir_children()["text"] = _node()  # type: ignore[index]  # a str name
    assert walk(root) is None
    with pytest.raises(TypeError):  # the pure walk's error stays: str and bytes do not sort
        root.dir_children()[b"b"] = _node()
        writer._walk_tree(root)

    class Other(Node):
        __slots__ = ()

    root = Node.directory()
    root.dir_children()[b"x"] = Other(mode=0o100644)
    assert walk(root) is None
    assert writer._walk_tree(root)[1:] == ([2, 1], [0, 0])


@settings(max_examples=300, deadline=None)
@given(
    names=st.lists(st.binary(min_size=1, max_size=255), max_size=60, unique=True),
    bs=st.sampled_from([200, 12 + 255, 512, 4096]),
)
def test_dir_block_plans_agree(names: list[bytes], bs: int) -> None:
    """Any names (ones sorting before `.` too), blocks small enough that one name can
    overflow an empty block: the same groups and last block's bytes."""
    children = {name: _node() for name in names if name not in (b".", b"..")}
    want = writer._dir_block_plan_pure(children, bs)
    assert _loops().dir_block_plan(children, bs) == want
    groups, used = want
    assert used == 12 * len(groups[-1]) + sum(map(len, groups[-1]))
    assert _loops().dir_block_plan({"text": _node()}, bs) is None


_ODD_INTS = st.sampled_from([0, 1, 3, 0xFFFF, 0x10000, 2**32 - 1, 2**32, 2**63, -1, -(2**63)])


@st.composite
def _file_nodes(draw: st.DrawFn) -> Node:
    """Files as a merge makes them (PackedChunks) with values in and out of every compact
    field's range, now and then with xattrs, other data or a foreign class."""
    from snapshotter.erofs.tree import Extent, PackedChunks

    kind = draw(st.sampled_from(["packed", "packed", "packed", "xattrs", "extent", "empty"]))
    node = _node(
        uid=draw(_ODD_INTS), gid=draw(st.sampled_from([0, 2, 0xFFFF, 0x10000])),
        mtime=draw(st.sampled_from([3, 4, 2**63])), mtime_nsec=draw(st.sampled_from([4, 5])),
        size=draw(st.sampled_from([1, 4096, 2**32 - 1, 2**32])),
    )  # fmt: skip
    if kind in ("packed", "xattrs"):
        bits = draw(st.sampled_from([0, 1, 31]))
        node.data = PackedChunks(bits, draw(st.sampled_from([b"\0" * 8, b"\1" * 16])))
    elif kind == "extent":
        node.data = Extent(7, 1)
    if kind == "xattrs":
        node.xattrs = {b"user.a": b"1"}
    return node


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(files=st.lists(_file_nodes(), min_size=1, max_size=20))
def test_file_columns_write_the_pure_loops_bytes(files: list[Node]) -> None:
    import os
    import tempfile

    root = Node.directory(mtime=3, mtime_nsec=4)
    sub = Node.directory(mtime=9)
    root.dir_children()[b"sub"] = sub
    for k, node in enumerate(files):
        (sub if k % 3 else root).dir_children()[b"f%d" % k] = node
    images = []
    for columns in (_loops().file_columns, None):
        with tempfile.TemporaryFile() as f, pytest.MonkeyPatch.context() as m:
            m.setattr(writer, "FILE_COLUMNS", columns)
            m.setattr(writer, "COMMON_MTIME", _loops().common_mtime if columns else None)
            data = writer.DataWriter(f.fileno(), 4096, writer.header_blocks(4096))
            try:
                writer.write_metadata(data, root, writer.ImageParams(build_time_from_tree=True))
            except Exception as exc:  # the same error both ways
                images.append(repr(exc))
                continue
            images.append(os.pread(f.fileno(), 1 << 20, 0))
    assert images[0] == images[1]
    # classes whose fields are not slots (InlineTail) are not read by offsets: None
    from snapshotter.erofs.tree import InlineTail

    args = ([files[0]], [1], 3, 4, InlineTail, [0], bytearray(1), [0], [0], [None])
    assert _loops().file_columns(*args) is None


@settings(max_examples=300, deadline=None)
@given(
    times=st.lists(
        st.tuples(st.sampled_from([0, 1, 7, -1, 2**63 - 1, -(2**63)]), st.integers(0, 3)),
        min_size=1,
        max_size=300,
    )
)
def test_common_mtime_picks_what_pick_build_time_picks(times: list[tuple[int, int]]) -> None:
    """Ties (the latest wins), negative and extreme seconds, tables that grow."""
    from collections import Counter

    from snapshotter.erofs.tree import pick_build_time

    nodes = [_node(mtime=s, mtime_nsec=ns) for s, ns in times]
    nodes += [_node(mtime=k, mtime_nsec=0) for k in range(100, 100 + len(times) // 3)]
    want = pick_build_time(Counter((n.mtime, n.mtime_nsec) for n in nodes))
    assert _loops().common_mtime(nodes) == want
    assert _loops().common_mtime([_node(mtime=2**63)]) is None  # beyond 64 bits: the pure pick
