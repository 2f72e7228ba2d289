"""The mounts a snapshot is used through, as containerd 2.1's erofs snapshotter hands them out.

- no parent: a bind mount of fs/ (rw for active, ro for a view);
- view of one committed layer: that layer's image, `{erofs, layer.erofs, [ro, loop]}`;
- otherwise overlay: lowerdir = the parents' fs/ directories with their layer.erofs mounted
  there by us (nearest parent first), plus upperdir=fs/ and workdir=work/ when active.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from snapshotter.layout import Layout
from snapshotter.store import Kind, Snapshot


@dataclass(frozen=True)
class Mount:
    """containerd.types.Mount."""

    type: str
    source: str
    options: list[str] = field(default_factory=list)
    target: str = ""


def plan(snap: Snapshot, layout: Layout) -> list[Mount]:
    """The mounts of SNAP (mounting its parents' layers on the host when an overlay needs them)."""
    if not snap.parent_ids:
        mode = "rw" if snap.kind == Kind.ACTIVE else "ro"
        return [Mount("bind", str(layout.fs(snap.id)), [mode, "rbind"])]
    if snap.kind == Kind.VIEW and len(snap.parent_ids) == 1:
        return [Mount("erofs", str(layout.layer(snap.parent_ids[0])), ["ro", "loop"])]
    options: list[str] = []
    if snap.kind == Kind.ACTIVE:
        options += [f"workdir={layout.work(snap.id)}", f"upperdir={layout.fs(snap.id)}"]
    lowers = [str(layout.mount_layer(pid)) for pid in snap.parent_ids]
    options.append("lowerdir=" + ":".join(lowers))
    return [Mount("overlay", "overlay", options)]
