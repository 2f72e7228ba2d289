"""`erofs-passthrough serve`: the containerd snapshotter (and differ) service."""

from __future__ import annotations

import argparse
from pathlib import Path

from snapshotter import logfmt


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve", help="serve containerd's Snapshots API over a unix socket (proxy plugin)",
        description="Serve containerd's Snapshots API (a proxy plugin) over a unix socket.",
    )
    p.add_argument("--root", type=Path, help="state directory (default /var/lib/erofs-passthrough)")
    p.add_argument("--address", type=Path, help="unix socket to listen on (mode 0600)")
    p.add_argument("--containerd-address", type=Path,
                   help="containerd's socket, for the differ's content reads")
    p.add_argument("--config", type=Path, help="TOML file with the same keys (root, address, ...)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from snapshotter.serve import Server, load_config

    config = load_config(args.config, root=args.root, address=args.address,
                         containerd_address=args.containerd_address, log_level=args.log_level)
    logfmt.setup(config.log_level)
    Server(config).run()
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m snapshotter.service_cli serve ...`: the service without the other commands."""
    parser = argparse.ArgumentParser(prog="erofs-passthrough")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
