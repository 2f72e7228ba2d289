"""`erofs-passthrough demo --json`, as README's first command runs it: a private containerd
(Debian trixie's 1.7) imports the demo image through our snapshotter and differ, a TCG guest
verifies and reads it, and the guest refuses swapped devices and a flipped byte. Both proofs
must hold."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.guest_fixtures import require_guest
from tests.support.helpers import require_tool

pytestmark = [pytest.mark.qemu, pytest.mark.root, pytest.mark.containerd, pytest.mark.slow]

HEX64 = re.compile(r"[0-9a-f]{64}")


def test_demo_proves_verified_read_and_tamper_detection() -> None:
    require_guest()
    for tool in ("containerd", "ctr", "runc", "busybox"):
        require_tool(tool)
    proc = subprocess.run(
        [sys.executable, "-m", "shim_integration.cli", "demo", "--json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    print(proc.stderr)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)  # stdout holds only the JSON object
    assert report["verified_read"] is True and report["tamper_detected"] is True
    assert report["tamper_errno"] == 5 and report["tamper_eio"] is True
    assert "not the signed device" in report["swap_refused"]
    assert "not served in lockdown" in report["bypass_refused"]
    roots = report["root_hashes"]
    assert HEX64.fullmatch(roots["fsmeta"]) and len(roots["layers"]) == 3
    assert all(HEX64.fullmatch(r) for r in roots["layers"])
    assert report["manifest_digest"] == report["guest_manifest_digest"]
    assert "verified by the guest, from layer 3" in report["command_output"]
    assert {"import", "boot", "open_image", "run", "tamper", "total"} <= set(report["timings"])
    assert "[10/10]" in proc.stderr
    assert report["containerd"]["differ"] is True, "1.7 unpacks through our differ"
    assert not Path(report["work_dir"]).exists(), "the demo left its work directory behind"
