"""Where a snapshot's files live, and the steps that create, publish and remove them.

    <root>/metadata.db                     the Store
    <root>/snapshots/<id>/.erofs-passthrough   marker: this directory is one of our snapshots
    <root>/snapshots/<id>/fs/              active: the writable upper dir (or the bind source);
                                           committed: mountpoint of layer.erofs for overlay lowers
    <root>/snapshots/<id>/work/            active: overlay workdir
    <root>/snapshots/<id>/layer.erofs      committed: the EROFS image with its dm-verity tree
    <root>/snapshots/<id>/layer.json       what Commit labels the snapshot with (LayerMeta)

A new snapshot is built under `snapshots/new-*` and renamed to its id inside the metadata
transaction; whatever a crash leaves (`new-*`, a directory without a row, `*.tmp`, `fs.old-*`)
is garbage that `Cleanup` removes.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from snapshotter import hostmount
from snapshotter.fsutil import fsync_dir, remove_tree, rename_durable, write_atomic
from snapshotter.store import Kind

MARKER = ".erofs-passthrough"
MARKER_TEXT = b"erofs-passthrough snapshot v1\n"
STAGING_PREFIX = "new-"


class Layout:
    """The snapshot directories under ROOT/snapshots."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.snapshots = root / "snapshots"
        self.snapshots.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._staging: set[str] = set()
        self._busy: Counter[str] = Counter()
        self._lock = threading.Lock()

    def dir(self, sid: str) -> Path:
        return self.snapshots / sid

    def fs(self, sid: str) -> Path:
        return self.snapshots / sid / "fs"

    def work(self, sid: str) -> Path:
        return self.snapshots / sid / "work"

    def layer(self, sid: str) -> Path:
        return self.snapshots / sid / "layer.erofs"

    def is_ours(self, sid: str) -> bool:
        return (self.snapshots / sid / MARKER).is_file()

    def stage(self, kind: Kind) -> Path:
        """A complete new snapshot directory under a temporary name (not yet any snapshot's)."""
        staged = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.snapshots))
        with self._lock:
            self._staging.add(staged.name)
        (staged / "fs").mkdir(mode=0o755)
        if kind == Kind.ACTIVE:
            (staged / "work").mkdir(mode=0o711)
        write_atomic(staged / MARKER, MARKER_TEXT)
        return staged

    def unstage(self, staged: Path) -> None:
        """Drop a staged directory that did not become a snapshot."""
        remove_tree(staged)
        with self._lock:
            self._staging.discard(staged.name)

    def claim(self, staged: Path, sid: str) -> None:
        """Give STAGED the name SID (called inside the transaction that created id SID).

        The id is new to the database, so a directory already called SID is an orphan of an
        earlier transaction that rolled back (or of a crash before its commit): remove it.
        """
        target = self.dir(sid)
        if target.exists():
            self.discard(target)
        rename_durable(staged, target)
        with self._lock:
            self._staging.discard(staged.name)

    def discard(self, path: Path) -> None:
        """Remove a snapshot directory: unmount its layer first, then delete the tree."""
        hostmount.unmount_all(path / "fs")
        remove_tree(path)

    def retire_upper(self, sid: str) -> None:
        """After Commit: replace fs/ (the unpacked layer) by an empty mountpoint for the blob."""
        fs = self.fs(sid)
        if hostmount.is_mountpoint(fs):
            return
        old = fs.with_name(f"fs.old-{uuid.uuid4().hex[:8]}")
        if fs.exists():
            os.rename(fs, old)
        fs.mkdir(mode=0o755)
        fsync_dir(fs.parent)
        remove_tree(old)
        self._remove_work(sid)

    def _remove_work(self, sid: str) -> None:
        work = self.work(sid)
        if work.exists():
            remove_tree(work)

    def orphans(self, known: set[str]) -> list[Path]:
        """Directories under snapshots/ that belong to no snapshot and no call in progress."""
        with self._lock:
            busy = set(self._staging)
        return sorted(
            p for p in self.snapshots.iterdir()
            if p.name not in known and p.name not in busy
        )

    @contextlib.contextmanager
    def busy(self, sid: str) -> Iterator[None]:
        """Mark SID as being written (a conversion): Cleanup leaves its temp files alone."""
        with self._lock:
            self._busy[sid] += 1
        try:
            yield
        finally:
            with self._lock:
                self._busy[sid] -= 1
                if not self._busy[sid]:
                    del self._busy[sid]

    def leftovers(self, sid: str, kind: Kind) -> list[Path]:
        """Garbage an interrupted call left inside live snapshot SID (none while it is busy)."""
        base = self.dir(sid)
        with self._lock:
            if sid in self._busy:
                return []
        if not base.is_dir():
            return []
        junk = [p for p in base.iterdir() if p.name.endswith(".tmp") or p.name.startswith("fs.old")]
        if kind == Kind.COMMITTED and self.work(sid).exists():
            junk.append(self.work(sid))
        return junk

    def mount_layer(self, sid: str) -> Path:
        """fs/ of committed SID with its layer.erofs mounted (mounted once, kept until Remove)."""
        fs = self.fs(sid)
        with self._lock:
            if not hostmount.is_mountpoint(fs):
                fs.mkdir(mode=0o755, exist_ok=True)
                hostmount.mount_erofs(self.layer(sid), fs)
        return fs
