"""`erofs-passthrough`: one thin CLI over the project's libraries.

Each package contributes its subcommands through a `register(subparsers)` function in its own
`cli` module; this module only wires them together, and `snapshotter.command` turns errors
into exit codes.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib.metadata import PackageNotFoundError, version

from snapshotter.command import run_command

COMMAND_MODULES = (
    "snapshotter.cli",
    "snapshotter.verity.cli",
    "snapshotter.service.cli",
    "shim_integration.key_cli",
    "shim_integration.publish_cli",
    "shim_integration.testbed.demo",
    "passthrough.cli",
)


def _version() -> str:
    try:
        return version("erofs-passthrough")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="erofs-passthrough",
        description="OCI layers as verified EROFS block devices for VM containers.",
    )
    parser.add_argument("--version", action="version", version=f"erofs-passthrough {_version()}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
