"""The optional compiled loops: built (this test fails where they are not, as CI must build
them) and switched off as a whole by EROFS_PASSTHROUGH_PURE=1, which each module reads at
import. Whether each gives the pure path's results is tested beside it (test_verity_hashing,
test_tarhdr, test_merge_scan, test_writer_loops)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# module, and the flag that says its compiled loop is in use
ACCELERATED_FLAGS = [
    ("snapshotter.verity.hashing", "ACCELERATED"),
    ("snapshotter.ingest.tarstream", "ACCELERATED"),
    ("snapshotter.fsmeta.merge", "ACCELERATED"),
    ("snapshotter.erofs.format", "LOOPS_ACCELERATED"),
]


@pytest.mark.parametrize(("value", "accelerated"), [("1", False), ("0", True), ("", True)])
@pytest.mark.parametrize(("module", "flag"), ACCELERATED_FLAGS)
def test_pure_switch(module: str, flag: str, value: str, accelerated: bool) -> None:
    code = f"import {module} as m; print(m.{flag})"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "EROFS_PASSTHROUGH_PURE": value},
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == str(accelerated), f"{module}.{flag}: {out.stderr}"
