"""A local OCI registry (Debian's docker-registry) and pushes to it with skopeo, skipping
with the reason where either tool is missing."""

from __future__ import annotations

import contextlib
from pathlib import Path

from shim_integration.testbed import local_registry
from shim_integration.testbed.local_registry import LocalRegistry
from tests.support.helpers import require_tool


def running_registry(directory: Path) -> contextlib.AbstractContextManager[LocalRegistry]:
    require_tool("docker-registry")  # a skip with the reason where it is missing
    return local_registry.running_registry(directory)


def push_image(archive: Path, reference: str, tmp: Path) -> None:
    require_tool("skopeo")
    local_registry.push_archive(archive, reference, tmp)
