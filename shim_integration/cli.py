"""`erofs-passthrough`: one thin CLI over the project's libraries.

Each package contributes its subcommands through a `register(subparsers)` function in its own
`cli` module; this module only wires them together, and `snapshotter.command` turns errors
into exit codes. A command line that names a command imports only the module that registers
it: importing all of them (the publish, merge and service stacks) cost ~0.4 s of CPU before
every `verity format` or `convert` (docs/benchmarks.md); `--help` and unknown commands still
see every command. `COMMANDS` is checked against what each module registers
(tests/unit/test_cli_commands.py).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import NoReturn

from snapshotter.command import run_command

#: each command, in the order `--help` lists them, and the module whose `register` adds it
COMMANDS = {
    "convert": "snapshotter.cli",
    "merge": "snapshotter.cli",
    "inspect": "snapshotter.cli",
    "verity": "snapshotter.verity.cli",
    "serve": "snapshotter.service.cli",
    "status": "snapshotter.service.cli",
    "key": "shim_integration.key_cli",
    "publish": "shim_integration.publish_cli",
    "manifest": "shim_integration.publish_cli",
    "demo": "shim_integration.testbed.demo",
    "attach": "passthrough.cli",
    "detach": "passthrough.cli",
}
COMMAND_MODULES = tuple(dict.fromkeys(COMMANDS.values()))
#: one-shot commands whose process ends without the interpreter's teardown (`entry`)
QUICK_EXIT = frozenset({"convert", "merge", "inspect"})


def _version() -> str:
    # importlib.metadata costs ~30 ms at start: only `--version` pays for it (_VersionAction).
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("erofs-passthrough")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


class _VersionAction(argparse.Action):
    """`--version`, its text looked up only when asked for."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kw: object):
        super().__init__(option_strings, dest, nargs=0, help="show the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        print(f"erofs-passthrough {_version()}")
        parser.exit()


def _modules_for(argv: list[str] | None) -> tuple[str, ...]:
    """The one module a command line needs, none for `--version` ahead of everything else
    (argparse acts on it, and exits, before it looks at a command), or all of them (help, a
    mistyped command)."""
    args = sys.argv[1:] if argv is None else argv
    if args and len(args[0]) >= 3 and "--version".startswith(args[0]):  # argparse's abbreviations
        return ()
    first = next((a for a in args if not a.startswith("-")), None)
    if first in COMMANDS and "--version" not in args:
        return (COMMANDS[first],)
    return COMMAND_MODULES


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser for `argv` (default: this process's): only its command's module is loaded."""
    parser = argparse.ArgumentParser(
        prog="erofs-passthrough",
        description="OCI layers as verified EROFS block devices for VM containers.",
    )
    parser.add_argument("--version", action=_VersionAction)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _modules_for(argv):
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(argv).parse_args(argv))


def entry() -> NoReturn:
    """The process's entry (the console script, `python -m shim_integration.cli`).

    After a one-shot command (QUICK_EXIT) the process ends with `os._exit` once its output is
    flushed, as mypy's does: the interpreter's teardown, freeing every object of a conversion
    or merge and every module, cost ~7 ms of a 10k-entry `convert`'s ~125 (docs/benchmarks.md)
    and does nothing those commands need: their outputs are fsynced and renamed and no thread
    or child outlives them. Other commands (the service, attach, ...) exit the usual way."""
    args = build_parser().parse_args()
    rc = run_command(args)
    if args.command in QUICK_EXIT:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except OSError:
            pass  # (a closed pipe: the usual exit reports it)
        else:
            os._exit(rc)
    sys.exit(rc)


if __name__ == "__main__":
    entry()
