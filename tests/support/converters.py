"""A Snapshotter's directory converter that a test can swap while the Snapshotter runs.

The Snapshotter takes its converter as a constructor argument (`convert=`, its public seam);
a test that needs a hook inside one Commit's conversion (a pause, a Cleanup in the middle)
builds the Snapshotter with this object and sets `hook`, instead of writing into the
Snapshotter's private state."""

from __future__ import annotations

from pathlib import Path

from snapshotter.service import layer_build
from snapshotter.service.snapshots import DirConverter


class SwappableConverter:
    """Runs `hook` if set, else the service's default conversion (containerd's salted tree)."""

    def __init__(self) -> None:
        self.hook: DirConverter | None = None

    def __call__(self, src: Path, out: Path) -> layer_build.LayerMeta:
        if self.hook is not None:
            return self.hook(src, out)
        return layer_build.convert_directory(src, out, verity=True)
