"""`publish` and `manifest fetch|verify`: signed root manifests beside images in a registry."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from shim_integration.publish import LAYER_MEDIA_TYPES, OCI_EROFS_LAYER
from snapshotter.fsutil import os_errors_as_ep


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "publish", help="convert an image in a registry, sign its root manifest, push it back"
    )
    p.add_argument("image", help="host[:port]/repo[:tag] or host[:port]/repo@sha256:<hex>")
    p.add_argument("--key", required=True, type=Path, help="the publisher's private key")
    p.add_argument("--plain-http", action="store_true", help="the registry speaks HTTP")
    p.add_argument(
        "--layers",
        action="store_true",
        help="also push the converted layers as an image of native EROFS layers",
    )
    p.add_argument("--layers-tag", help="tag of that image (default: TAG-erofs)")
    p.add_argument(
        "--layer-media-type",
        default=OCI_EROFS_LAYER,
        choices=LAYER_MEDIA_TYPES,
        help="media type of that image's layers: the default is what containerd "
        "1.7-2.2 unpack; application/vnd.erofs.layer.v1 is what containerd "
        '2.3+\'s own erofs differ takes (docs/publish.md, "Media type")',
    )
    p.add_argument(
        "--kata-verity",
        action="store_true",
        help="unsalted layer trees, as `serve` with kata_verity (docs/kata.md)",
    )
    p.add_argument("--platform", default="linux/amd64", help="os/arch to pick from an index")
    p.add_argument(
        "--out-cache",
        type=Path,
        metavar="DIR",
        help="also put the converted layers into this layer cache directory "
        "(serve's layer_caches, containerd's layer_content_caches layout)",
    )
    p.add_argument("--json", action="store_true", help="print every digest pushed as JSON")
    p.set_defaults(func=_publish)

    m = subparsers.add_parser("manifest", help="fetch or verify a published root manifest")
    sub = m.add_subparsers(dest="manifest_command", required=True, metavar="ACTION")
    f = sub.add_parser("fetch", help="the newest root manifest referring to an image")
    f.add_argument("image")
    f.add_argument(
        "--out", required=True, type=Path, help="directory for manifest.json and manifest.sig"
    )
    f.add_argument("--plain-http", action="store_true")
    f.add_argument("--platform", default="linux/amd64")
    f.add_argument("--json", action="store_true")
    f.set_defaults(func=_fetch)
    v = sub.add_parser("verify", help="check a fetched manifest's signature and roots")
    v.add_argument("directory", type=Path, help="holds manifest.json and manifest.sig")
    v.add_argument(
        "--trust",
        required=True,
        action="append",
        type=Path,
        help="a trusted public key (repeatable)",
    )
    which = v.add_mutually_exclusive_group()
    which.add_argument(
        "--devices", type=Path, help="device list to compare: a chain's fsmeta.json or a JSON list"
    )
    which.add_argument(
        "--snapshot",
        type=Path,
        metavar="ROOT/KEY",
        help="compare a VM-mode snapshot's devices (serve's root, then its key)",
    )
    v.add_argument("--image", help="require the manifest to be for this image digest")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=_verify)


@os_errors_as_ep(lambda args: str(args.key))
def _publish(args: argparse.Namespace) -> int:
    from shim_integration.publish import publish

    report = publish(
        args.image,
        args.key,
        plain_http=args.plain_http,
        push_layers=args.layers,
        layers_tag=args.layers_tag,
        kata_verity=args.kata_verity,
        platform=args.platform,
        out_cache=args.out_cache,
        layer_media_type=args.layer_media_type,
    )
    if args.json:
        print(json.dumps(report, sort_keys=True))
    else:
        rm = report["root_manifest"]
        print(
            f"{report['image']} ({report['image_digest']}): root manifest {rm['artifact']} "
            f"signed by {rm['key_id']}"
        )
        if "erofs_image" in report:
            e = report["erofs_image"]
            print(
                f"EROFS image {e['reference']} ({e['digest']}): root manifest "
                f"{e['root_manifest']['artifact']}"
            )
        if "cache" in report:
            print(f"{len(report['cache'])} layers in the cache {args.out_cache}")
    return 0


@os_errors_as_ep(lambda args: str(args.out))
def _fetch(args: argparse.Namespace) -> int:
    from shim_integration.publish import fetch_manifest

    report = fetch_manifest(
        args.image, args.out, plain_http=args.plain_http, platform=args.platform
    )
    if args.json:
        print(json.dumps(report, sort_keys=True))
    else:
        print(
            f"{report['manifest']}: root manifest {report['artifact']} of {report['image_digest']}"
        )
    return 0


@os_errors_as_ep(lambda args: str(args.directory))
def _verify(args: argparse.Namespace) -> int:
    from shim_integration.publish import snapshot_devices, verify_directory

    devices = snapshot_devices(args.snapshot) if args.snapshot else args.devices
    report = verify_directory(args.directory, args.trust, devices, args.image)
    if args.json:
        print(json.dumps(report, sort_keys=True))
    else:
        what = f"; the {len(report['roots'])} roots of {devices} match" if devices else ""
        print(
            f"{args.directory}: signed by {report['key_id']} for image "
            f"{report['image'].get('digest', '?')}{what}"
        )
    return 0
