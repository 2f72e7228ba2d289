"""`erofs-passthrough`: one thin CLI over the project's libraries.

Each package contributes its subcommands through a `register(subparsers)` function in its own
`cli` module; this module only wires them together and turns errors into exit codes.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
from importlib.metadata import PackageNotFoundError, version

from snapshotter.errors import EpError

COMMAND_MODULES = (
    "snapshotter.erofs.cli",
    "snapshotter.verity.cli",
    "snapshotter.service_cli",
    "shim_integration.key_cli",
    "shim_integration.publish_cli",
    "shim_integration.demo",
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


def _exit_on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM ends a command the way an error does: `finally` blocks and cleanup handlers
    run (no temp file of `atomic_output` is left behind, an in-place `verity format` is
    undone), then the exit status is 143 as for a process killed by SIGTERM. A second SIGTERM
    during that cleanup is ignored; SIGKILL still stops everything."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if in_main_thread else None
    try:
        return int(args.func(args) or 0)
    except EpError as exc:
        print(f"erofs-passthrough {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`... | head`): stop quietly, as other command-line tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
