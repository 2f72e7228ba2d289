"""Where the test guest's kernel, initramfs and root image are: runs `vm-images/build --json`
(which builds on the first call and only checks its cache keys afterwards) and reads its
manifest."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from passthrough.errors import PassthroughError

REPO = Path(__file__).resolve().parent.parent
BUILD = REPO / "vm-images" / "build"


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path
    root_image: Path
    root_serial: str
    kernel_args: tuple[str, ...]
    root_verity: dict[str, Any]
    kernel_release: str

    @classmethod
    def from_manifest(cls, m: dict[str, Any]) -> GuestImage:
        return cls(
            Path(m["kernel"]),
            Path(m["initrd"]),
            Path(m["root_image"]),
            m["root_serial"],
            tuple(m["kernel_args"]),
            m["root_verity"],
            m["kernel_release"],
        )


def ensure_guest_image(timeout: float = 900.0) -> GuestImage:
    """Build the guest artifacts if the cache lacks them (needs root, apt and debootstrap)."""
    if not BUILD.exists():
        raise PassthroughError(f"{BUILD} missing: not running from a source checkout")
    proc = subprocess.run(
        [str(BUILD), "--json"],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=dict(os.environ),
    )
    if proc.returncode != 0:
        raise PassthroughError(f"guest image build failed: {proc.stderr.strip()[-2000:]}")
    return GuestImage.from_manifest(json.loads(proc.stdout))
