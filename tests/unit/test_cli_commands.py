"""The root CLI's command table is what its modules register, and a command line loads only
the module of its command (the others' imports cost every invocation ~0.4 s)."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys

from shim_integration.cli import COMMAND_MODULES, COMMANDS, build_parser


def test_the_table_names_each_command_of_each_module() -> None:
    registered: dict[str, str] = {}
    for module in COMMAND_MODULES:
        subparsers = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(module).register(subparsers)
        registered.update(dict.fromkeys(subparsers.choices, module))
    assert registered == COMMANDS


def test_help_lists_every_command() -> None:
    text = build_parser(["--help"]).format_help()
    for command in COMMANDS:
        assert command in text


def test_a_command_line_imports_only_its_module() -> None:
    probe = (
        "import sys; from shim_integration.cli import build_parser; "
        "build_parser(['verity', 'format', 'a', 'b']); "
        "print(' '.join(m for m in ('shim_integration.publish', 'snapshotter.fsmeta.merge', "
        "'snapshotter.service.serve', 'passthrough.qmp') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], check=True, capture_output=True, text=True
    ).stdout
    assert out.strip() == ""
