"""The mounts a snapshot is used through, in one of two styles (serve's `mount_style`).

"classic" (the default), what containerd 2.1's erofs snapshotter handed out and every containerd
since 1.6 mounts with mount(2):
- no parent: a bind mount of fs/ (rw for active, ro for a view);
- view of one committed layer: that layer's image, `{erofs, layer.erofs, [ro, loop]}`;
- otherwise overlay: lowerdir = the parents' fs/ directories with their layer.erofs mounted
  there by us (nearest parent first), plus upperdir=fs/ and workdir=work/ when active.

"containerd-2.3", exactly what containerd main's erofs snapshotter returns
(`plugins/snapshots/erofs/erofs.go`, `mounts` and `createErofsMount`, non-block mode, no
merged fsmeta), which only containerd's mount manager (2.2+; `X-containerd.dmverity` since
2.3.0) can mount, and Kata runtime-rs' erofs path consumes:
- no parent: the snapshot's own layer as `{erofs, layer.erofs, [ro, loop,
  X-containerd.dmverity=layer.erofs.dmverity]}` once it has one (our differ applied it),
  else the bind mount above;
- view of one committed layer: that layer's erofs mount;
- otherwise one erofs mount per parent (nearest first), then `{format/mkdir/overlay, overlay}`
  with `lowerdir={{ overlay 0 N-1 }}` (`{{ mount 0 }}` for an active snapshot of one parent),
  after `workdir=`, `upperdir=` when active. The layers are not mounted on the host for it
  (only Prepare's ownership copy of the nearest parent's root mounts that one).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from snapshotter.errors import FailedPrecondition
from snapshotter.service import layer_build
from snapshotter.service.layout import Layout
from snapshotter.service.store import Kind, Snapshot

CLASSIC = "classic"
CONTAINERD_2_3 = "containerd-2.3"
MOUNT_STYLES = (CLASSIC, CONTAINERD_2_3)
DMVERITY_OPTION = "X-containerd.dmverity="  # containerd's `applyDmverityPolicy`


@dataclass(frozen=True)
class Mount:
    """containerd.types.Mount."""

    type: str
    source: str
    options: list[str] = field(default_factory=list)
    target: str = ""


def plan(snap: Snapshot, layout: Layout, style: str = CLASSIC) -> list[Mount]:
    """The mounts of SNAP in STYLE (classic: mounting its parents' layers on the host when an
    overlay needs them)."""
    if style == CONTAINERD_2_3:
        return _plan_containerd_2_3(snap, layout)
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


def _erofs_mount(layout: Layout, sid: str) -> Mount | None:
    """containerd's `createErofsMount` for SID's layer, None when SID has no complete layer.
    A layer stored before sidecars were written gets its sidecar now, from its layer.json."""
    directory = layout.dir(sid)
    meta = layer_build.read_layer(directory)
    if meta is None:
        return None
    sidecar = directory / layer_build.SIDECAR
    if not sidecar.is_file():
        with layout.hold(sid):  # Cleanup's leftover scan would take the sidecar's temp file
            layer_build.ensure_sidecar(directory, meta)
    return Mount("erofs", str(layout.layer(sid)), ["ro", "loop", DMVERITY_OPTION + str(sidecar)])


def _plan_containerd_2_3(snap: Snapshot, layout: Layout) -> list[Mount]:
    if not snap.parent_ids:
        own = _erofs_mount(layout, snap.id)
        if own is not None:
            return [own]
        mode = "ro" if snap.kind == Kind.VIEW else "rw"
        return [Mount("bind", str(layout.fs(snap.id)), [mode, "rbind"])]
    lowers: list[Mount] = []
    for pid in snap.parent_ids:
        lower = _erofs_mount(layout, pid)
        if lower is None:  # containerd: "failed to find valid erofs layer blob"
            raise FailedPrecondition(f"parent snapshot {pid} has no complete layer blob")
        lowers.append(lower)
    if snap.kind != Kind.ACTIVE and len(lowers) == 1:
        return lowers
    options: list[str] = []
    if snap.kind == Kind.ACTIVE:
        options += [f"workdir={layout.work(snap.id)}", f"upperdir={layout.fs(snap.id)}"]
    if len(lowers) == 1:  # only an active snapshot gets here with one lower
        options.append("lowerdir={{ mount 0 }}")
    else:
        options.append(f"lowerdir={{{{ overlay 0 {len(lowers) - 1} }}}}")
    return [*lowers, Mount("format/mkdir/overlay", "overlay", options)]
