"""`key generate|show`: signing keys for root-hash manifests."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from snapshotter.errors import AlreadyExists, InvalidInput
from snapshotter.fsutil import check_output, open_input, os_errors_as_ep

ALGORITHMS = ("ed25519", "ecdsa-p256")  # as manifest.ALGORITHMS; cryptography loads lazily


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("key", help="manifest signing keys")
    sub = p.add_subparsers(dest="key_command", required=True, metavar="ACTION")
    g = sub.add_parser("generate", help="write a private key (0600) and KEY.pub")
    g.add_argument("path", help="private key file to create")
    g.add_argument("--algorithm", choices=ALGORITHMS, default="ed25519")
    g.add_argument("--force", action="store_true", help="replace an existing key")
    g.add_argument("--json", action="store_true")
    g.set_defaults(func=_generate)
    s = sub.add_parser("show", help="print a key's id and public key")
    s.add_argument("path", help="private or public key file")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_show)


@os_errors_as_ep(lambda args: args.path)
def _generate(args: argparse.Namespace) -> int:
    from snapshotter.manifest import ManifestError, generate_key

    path = Path(args.path)
    if path.exists() and not args.force:
        raise AlreadyExists(f"{path} exists (use --force to replace it)")
    check_output(path)
    check_output(f"{path}.pub")
    try:
        kid = generate_key(path, args.algorithm)
    except ManifestError as exc:
        raise InvalidInput(str(exc)) from exc
    if args.json:
        print(
            json.dumps(
                {
                    "key_id": kid,
                    "algorithm": args.algorithm,
                    "private": str(path),
                    "public": f"{path}.pub",
                }
            )
        )
    else:
        print(f"{kid}\nprivate key: {path} (mode 0600)\npublic key:  {path}.pub")
    return 0


@os_errors_as_ep(lambda args: args.path)
def _show(args: argparse.Namespace) -> int:
    from snapshotter.manifest import ManifestError, key_id, load_public_key

    with open_input(args.path) as f:
        data = f.read(1 << 20)  # a PEM key is a few hundred bytes
    try:
        key = load_public_key(data)
    except ManifestError as exc:
        raise InvalidInput(f"{args.path}: {exc}") from exc
    from cryptography.hazmat.primitives import serialization

    pem = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    if args.json:
        print(json.dumps({"key_id": key_id(key), "public_key": pem}))
    else:
        print(key_id(key))
        print(pem, end="")
    return 0
