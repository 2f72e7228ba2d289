"""The root CLI (`python -m shim_integration.cli`) run as a user runs it, in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

CLI = [sys.executable, "-m", "shim_integration.cli"]
TIMEOUT = 120  # seconds: publish and fetch talk to a local registry


def run_cli(
    *args: str | Path, check: bool = True, timeout: float | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the CLI; with CHECK (the default) a non-zero exit fails the test with its stderr."""
    proc = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"CLI failed ({proc.returncode}): {proc.stderr}")
    return proc


def convert(layer: Path, out: Path, *extra: str) -> dict:
    """`convert LAYER OUT --json`: the conversion report."""
    return json.loads(run_cli("convert", layer, out, "--json", *extra).stdout)


def ok_json(*args: str | Path) -> dict:
    """A command that must succeed, with `--json`: its report."""
    proc = run_cli(*args, "--json", check=False, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)
