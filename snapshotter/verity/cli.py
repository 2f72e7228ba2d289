"""`verity format` and `verity verify`: thin commands over the dm-verity library."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from snapshotter.errors import InvalidArgument
from snapshotter.fsutil import check_input, check_output, os_errors_as_ep
from snapshotter.verity.files import file_sha256, format_file
from snapshotter.verity.info import VerityInfo
from snapshotter.verity.params import HASH_NAMES, VerityParams, derive_salt, parse_salt, parse_uuid
from snapshotter.verity.verify import read_superblock, verify_file


def register(subparsers: argparse._SubParsersAction) -> None:
    verity = subparsers.add_parser("verity", help="dm-verity hash trees (veritysetup-compatible)")
    sub = verity.add_subparsers(dest="verity_command", required=True, metavar="SUBCOMMAND")

    p = sub.add_parser(
        "format",
        help="build the hash tree of DATA",
        description="Build the dm-verity tree of DATA, the same bytes and root hash as "
        "`veritysetup format` with the same parameters. Default: appended to DATA at the next "
        "data-block boundary (DATA zero padded), v1 superblock, sha256, 4096/4096, salt "
        "derived from DATA's sha256. A DATA that already ends with an appended tree "
        "(with a superblock) is refused, unchanged, unless --force.",
    )
    p.add_argument("data", help="the data file")
    p.add_argument("--hash-file", help="write the tree to this new file instead of appending")
    _geometry(p, defaults=True)
    p.add_argument("--uuid", help="superblock UUID (default: derived from root hash and salt)")
    p.add_argument(
        "--digest",
        help="sha256:HEX of the blob to derive the salt from (default: DATA's own sha256)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="append even if DATA already ends with a dm-verity tree",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_format)

    p = sub.add_parser(
        "verify",
        help="check DATA and its tree against a root hash",
        description="Check every hash block and data block against ROOT; the first bad block "
        "is named. With a superblock, unspecified parameters come from it.",
    )
    p.add_argument("data", help="the data file")
    p.add_argument("--root-hash", required=True, help="the expected root hash (hex)")
    p.add_argument("--hash-file", help="the tree is in this file (default: appended to DATA)")
    p.add_argument(
        "--hash-offset",
        type=int,
        help="byte offset of the hash area (superblock); required for an appended tree",
    )
    p.add_argument("--data-blocks", type=int, help="number of data blocks (no superblock)")
    _geometry(p, defaults=False)
    p.set_defaults(func=_verify)


def _geometry(p: argparse.ArgumentParser, *, defaults: bool) -> None:
    p.add_argument(
        "--salt",
        help="salt as hex, '-' for none"
        + (" (default: derived from the data's sha256)" if defaults else ""),
    )
    p.add_argument("--data-block-size", type=int, default=4096 if defaults else None, metavar="N")
    p.add_argument("--hash-block-size", type=int, default=4096 if defaults else None, metavar="N")
    p.add_argument("--no-superblock", action="store_true", help="no v1 superblock")
    p.add_argument("--hash", choices=HASH_NAMES, default="sha256" if defaults else None)


@os_errors_as_ep(lambda args: args.hash_file or args.data)
def _format(args: argparse.Namespace) -> int:
    data = Path(args.data)
    check_input(data)
    if args.hash_file is not None:
        check_output(args.hash_file, [data])
    if args.salt is not None:
        salt = parse_salt(args.salt)
    else:
        salt = derive_salt(args.digest if args.digest else file_sha256(data))
    params = VerityParams(
        hash_name=args.hash,
        data_block_size=args.data_block_size,
        hash_block_size=args.hash_block_size,
        salt=salt,
        superblock=not args.no_superblock,
        uuid=parse_uuid(args.uuid) if args.uuid else None,
    )
    info = format_file(data, hash_path=args.hash_file, params=params, append_again=args.force)
    _print(info, args.json)
    return 0


def _print(info: VerityInfo, as_json: bool) -> None:
    if as_json:
        print(json.dumps(info.to_json(), indent=2))
        return
    for key in (
        "root_hash",
        "salt",
        "hash_name",
        "data_block_size",
        "hash_block_size",
        "data_blocks",
        "hash_offset",
        "hash_start_block",
        "uuid",
    ):
        value = getattr(info, key)
        print(f"{key:16} {value if value not in (None, '') else '-'}")


@os_errors_as_ep(lambda args: args.data)
def _verify(args: argparse.Namespace) -> int:
    data = Path(args.data)
    check_input(data)
    hash_path = Path(args.hash_file) if args.hash_file else None
    if hash_path is not None:
        check_input(hash_path)
    if args.hash_offset is not None and args.hash_offset < 0:
        raise InvalidArgument(f"--hash-offset {args.hash_offset}: must be a byte offset >= 0")
    if args.data_blocks is not None and args.data_blocks < 1:
        raise InvalidArgument(f"--data-blocks {args.data_blocks}: must be at least 1")
    hash_offset = args.hash_offset
    if hash_offset is None:
        if hash_path is None:
            raise InvalidArgument("an appended tree needs --hash-offset (or give --hash-file)")
        hash_offset = 0
    if args.no_superblock:
        if args.salt is None:
            raise InvalidArgument("without a superblock the salt must be given (--salt HEX or -)")
        params = VerityParams(
            hash_name=args.hash or "sha256",
            data_block_size=args.data_block_size or 4096,
            hash_block_size=args.hash_block_size or 4096,
            salt=parse_salt(args.salt),
            superblock=False,
        )
    else:
        # Unspecified parameters come from the superblock; given ones must match it.
        sb = read_superblock(hash_path or data, hash_offset)
        params = VerityParams(
            hash_name=args.hash or sb.algorithm,
            data_block_size=args.data_block_size or sb.data_block_size,
            hash_block_size=args.hash_block_size or sb.hash_block_size,
            salt=sb.salt if args.salt is None else parse_salt(args.salt),
            superblock=True,
        )
    verify_file(
        data,
        params,
        hash_path=hash_path,
        root_hash=args.root_hash,
        hash_offset=hash_offset,
        data_blocks=args.data_blocks,
    )
    print(f"{data}: verified against root hash {args.root_hash}")
    return 0
