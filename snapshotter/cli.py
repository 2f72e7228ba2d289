"""`convert`, `merge` and `inspect`: thin commands over the EROFS library."""

from __future__ import annotations

import argparse
import os
import stat
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from snapshotter.errors import InvalidArgument
from snapshotter.fsutil import check_input, check_output, open_input, os_errors_as_ep
from snapshotter.progress import CountingReader, Progress

if TYPE_CHECKING:
    from snapshotter.erofs.reader import ErofsImage

# The libraries behind each command are imported by the command that runs (`register`, and so
# `--help`, needs none of them): `convert` does not pay for the reader, json or uuid, nor
# `inspect` for the conversion stack (docs/benchmarks.md, "CLI start-up").


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert an OCI layer (tar, tar.gz, tar.zst)",
        description="Convert an OCI layer into an EROFS image. LAYER must be a regular file; "
        "to read a pipe or a FIFO, give '-' and redirect it to standard input. On a terminal, "
        "progress is shown on stderr.",
    )
    p.add_argument("layer", help="the layer file ('-' for standard input)")
    p.add_argument("out", help="the EROFS image to write")
    p.add_argument("--diff-id", help="expected diffID (sha256:...) of the uncompressed tar")
    p.add_argument(
        "--verity",
        action="store_true",
        help="append a dm-verity tree (sha256, 4096/4096, v1 superblock)",
    )
    p.add_argument(
        "--block-size",
        type=int,
        default=4096,
        help="EROFS block size (4096; 512 only for kernels >= 6.4)",
    )
    p.add_argument(
        "--no-tail-packing",
        dest="tail_packing",
        action="store_false",
        help="store every file larger than 512 bytes as whole blocks (by default, as "
        "mkfs.erofs does, a file's last partial block goes inline after its inode when it "
        "fits)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_convert)

    p = subparsers.add_parser(
        "merge",
        help="merge layer images (lowest first) into one metadata-only fsmeta",
        description="Merge layer images (lowest first) into one metadata-only fsmeta. On a "
        "terminal, progress is shown on stderr.",
    )
    p.add_argument("out", help="the fsmeta image to write")
    p.add_argument("layers", nargs="+", help="layer images, lowest first (device 1 = first)")
    p.add_argument(
        "--verity",
        action="store_true",
        help="append a dm-verity tree to the fsmeta (and the flat image)",
    )
    p.add_argument(
        "--flat",
        metavar="OUT.img",
        help="also write one flat image: the fsmeta's file and every blob file, whole "
        "(verity trees included), back to back: what `cat` of them gives",
    )
    p.add_argument(
        "--tag",
        action="append",
        default=[],
        metavar="DIGEST",
        help="device tag per layer, in order (default: the layer's UUID)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_merge)

    p = subparsers.add_parser("inspect", help="show an EROFS image's superblock and tree")
    p.add_argument("image")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-tree", action="store_true", help="omit the tree listing")
    p.set_defaults(func=_inspect)


def _print_json(obj: object) -> None:
    import json

    print(json.dumps(obj, indent=2))


@os_errors_as_ep(lambda args: args.out)
def _convert(args: argparse.Namespace) -> int:
    from snapshotter.heap import keep_freed_buffers
    from snapshotter.ingest.convert import convert_layer

    keep_freed_buffers()  # the process's job is this conversion (heap.py)
    from_stdin = args.layer == "-"
    source = sys.stdin.buffer if from_stdin else open_input(args.layer)
    try:
        check_output(args.out, [] if from_stdin else [args.layer])
        total = None if from_stdin else os.fstat(source.fileno()).st_size
        with Progress("convert") as progress:
            # Without a progress line to draw, the file itself: a plain tar in a regular file
            # then takes convert_layer's mmap path (no read() copies, no producer thread).
            result = convert_layer(
                CountingReader(source, progress, total) if progress.active else source,
                args.out,
                expected_diff_id=args.diff_id,
                verity=True if args.verity else None,
                block_size=args.block_size,
                tail_packing=args.tail_packing,
                source_digest=args.json,  # printed only there
            )
    finally:
        if not from_stdin:
            source.close()
    if args.json:
        _print_json(result.to_json())
    else:
        print(
            f"{result.blob}: {result.size} bytes, {result.entries} entries, "
            f"diff_id {result.diff_id}"
        )
        if result.verity is not None:
            print(
                f"verity root hash {result.verity.root_hash} "
                f"(hash offset {result.verity.hash_offset})"
            )
    return 0


@os_errors_as_ep(lambda args: args.out)
def _merge(args: argparse.Namespace) -> int:
    if args.tag and len(args.tag) != len(args.layers):
        raise InvalidArgument(f"{len(args.tag)} --tag values for {len(args.layers)} layers")
    for path in args.layers:
        check_input(path)
    check_output(args.out, args.layers)
    if args.flat is not None:
        check_output(args.flat, [*args.layers, args.out])
        if os.path.abspath(args.flat) == os.path.abspath(args.out):
            raise InvalidArgument(
                f"{args.flat}: the flat image and the fsmeta need different names"
            )
    tags = args.tag or [None] * len(args.layers)
    # Imported here: the merge's stack is not needed by `convert` or `inspect` (~25 ms).
    from snapshotter.fsmeta.merge import LayerBlob, merge_layers

    layers = [LayerBlob(Path(p), t) for p, t in zip(args.layers, tags, strict=True)]
    with Progress("merge") as progress:
        result = merge_layers(
            layers, args.out, verity=args.verity, flat_path=args.flat, progress=progress.update
        )
    if args.json:
        _print_json(result.to_json())
        return 0
    print(
        f"{result.fsmeta}: {result.size} bytes, {result.entries} entries, "
        f"{len(result.devices)} devices"
    )
    for i, d in enumerate(result.devices, start=1):
        print(f"  device {i}: {d.path} tag={d.tag} blocks={d.blocks} uniaddr={d.uniaddr}")
    if result.verity is not None:
        print(f"verity root hash {result.verity.root_hash}")
    if result.flat is not None:
        print(f"flat image {result.flat}: {result.flat_size} bytes")
    return 0


@os_errors_as_ep(lambda args: args.image)
def _inspect(args: argparse.Namespace) -> int:
    from snapshotter.erofs.reader import ErofsImage

    check_input(args.image)
    with ErofsImage(args.image) as image:
        report = describe(image, tree=not args.no_tree)
    if args.json:
        _print_json(report)
        return 0
    sb = report["superblock"]
    for key, value in sb.items():
        print(f"{key:16} {value}")
    for i, dev in enumerate(report["devices"], start=1):
        print(f"device {i:<9} tag={dev['tag']} blocks={dev['blocks']} uniaddr={dev['uniaddr']}")
    print(f"{'paths walked':16} {report['inodes']}")
    for entry in report.get("tree", []):
        extra = f" -> {entry['target']}" if "target" in entry else ""
        print(
            f"{entry['mode']} {entry['uid']:>5} {entry['gid']:>5} {entry['size']:>10} "
            f"/{entry['path']}{extra}"
        )
    return 0


def describe(image: ErofsImage, tree: bool = True) -> dict:
    import uuid

    from snapshotter.erofs.format import decode_dev

    sb = image.sb
    report: dict = {
        "superblock": {
            "block_size": sb.block_size,
            "blocks": sb.blocks,
            "inodes": sb.inos,
            "root_nid": sb.root_nid,
            "meta_blkaddr": sb.meta_blkaddr,
            "xattr_blkaddr": sb.xattr_blkaddr,
            "build_time": sb.build_time,
            "uuid": str(uuid.UUID(bytes=sb.uuid)),
            "feature_compat": sb.feature_compat,
            "feature_incompat": sb.feature_incompat,
        },
        "devices": [
            {"tag": d.tag.decode("ascii", "replace"), "blocks": d.blocks, "uniaddr": d.uniaddr}
            for d in image.device_slots
        ],
    }
    entries = []
    count = 0
    for path, info in image.walk():
        count += 1
        if not tree:
            continue
        entry = {
            "path": path.decode("utf-8", "surrogateescape"),
            "mode": stat.filemode(info.mode),
            "uid": info.inode.uid,
            "gid": info.inode.gid,
            "size": info.size,
            "nlink": info.inode.nlink,
            "mtime": info.inode.mtime,
        }
        if stat.S_ISLNK(info.mode):
            entry["target"] = image.readlink(info).decode("utf-8", "surrogateescape")
        elif stat.S_ISCHR(info.mode) or stat.S_ISBLK(info.mode):
            entry["rdev"] = list(decode_dev(info.inode.i_u))
        entries.append(entry)
    report["inodes"] = count
    if tree:
        report["tree"] = entries
    return report
