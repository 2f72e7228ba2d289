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

Within the process, calls that write one snapshot's directory (Commit, Apply, Remove) hold that
snapshot's lock (`hold`/`busy`) for the whole call, so they run one after another; Cleanup never
touches a snapshot whose lock is held. A staged directory is registered before it exists, so
Cleanup never mistakes it for an orphan. Other processes are kept out by the server's lock on
the root (serve.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from snapshotter.errors import FailedPrecondition, NotFound
from snapshotter.fsutil import fsync_dir, remove_tree, rename_durable, write_atomic
from snapshotter.service import hostmount
from snapshotter.service.store import Kind

log = logging.getLogger(__name__)

MARKER = ".erofs-passthrough"
MARKER_TEXT = b"erofs-passthrough snapshot v1\n"
STAGING_PREFIX = "new-"


KindOf = Callable[[str], Kind | None]


class _SnapshotLock:
    """One snapshot's lock and how many calls hold or wait for it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0


class Layout:
    """The snapshot directories under ROOT/snapshots.

    KIND_OF(id) says what the metadata says a snapshot is now (None: no such row); `busy`
    uses it to refuse writing a layer into a snapshot that is no longer active.
    """

    def __init__(self, root: Path, kind_of: KindOf | None = None) -> None:
        self.root = root
        self.snapshots = root / "snapshots"
        self.snapshots.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._kind_of = kind_of
        self._staging: set[str] = set()
        self._held: dict[str, _SnapshotLock] = {}
        self._lock = threading.Lock()
        # Retired uppers (fs.old-*) waiting for the remover thread, and its wake-up.
        self._removals: list[tuple[str, Path]] = []
        self._removals_changed = threading.Condition(self._lock)
        self._remover: threading.Thread | None = None

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
        staged = self.snapshots / f"{STAGING_PREFIX}{uuid.uuid4().hex}"
        with self._lock:  # registered before it exists: Cleanup's scan must never see it bare
            self._staging.add(staged.name)
        try:
            staged.mkdir(mode=0o700)
        except BaseException:
            with self._lock:
                self._staging.discard(staged.name)
            raise
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
        """After Commit: replace fs/ (the unpacked layer) by an empty mountpoint for the blob.

        The unpacked tree itself (thousands of files: seconds of unlinking on a busy disk) is
        renamed to fs.old-* and removed by a background thread under the snapshot's lock, off
        Commit's path; what a crash leaves of it is a `leftovers` of the next start."""
        fs = self.fs(sid)
        if hostmount.is_mountpoint(fs):
            return
        old = fs.with_name(f"fs.old-{uuid.uuid4().hex[:8]}")
        if fs.exists():
            os.rename(fs, old)
        fs.mkdir(mode=0o755)
        fsync_dir(fs.parent)
        if old.exists():
            self._remove_later(sid, old)
        self._remove_work(sid)

    def _remove_later(self, sid: str, path: Path) -> None:
        with self._lock:
            self._removals.append((sid, path))
            self._removals_changed.notify_all()
            if self._remover is None:
                self._remover = threading.Thread(
                    target=self._remove_retired, name="retired-uppers", daemon=True
                )
                self._remover.start()

    def _remove_retired(self) -> None:
        while True:
            with self._lock:
                while not self._removals:
                    self._removals_changed.wait()
                sid, path = self._removals[0]
            try:
                with self.hold(sid):  # after the Commit that retired it; never beside a call
                    remove_tree(path)
            except Exception as exc:  # the next start's cleanup removes it
                log.warning(
                    "retired upper not removed", extra={"path": str(path), "error": str(exc)}
                )
            with self._lock:
                self._removals.pop(0)
                self._removals_changed.notify_all()

    def wait_removals(self, timeout: float | None = None) -> bool:
        """Wait until every retired upper is removed; False if TIMEOUT passed first."""
        with self._lock:
            return self._removals_changed.wait_for(lambda: not self._removals, timeout)

    def _remove_work(self, sid: str) -> None:
        work = self.work(sid)
        if work.exists():
            remove_tree(work)

    def orphans(self, known: set[str]) -> list[Path]:
        """Directories under snapshots/ that belong to no snapshot and no call in progress.

        KNOWN must be read in the same metadata transaction the caller still holds while it
        removes what this returns: creation claims its directory inside its own transaction,
        so no snapshot can appear between the two reads.
        """
        listed = list(self.snapshots.iterdir())
        # Read after listing: a directory listed was registered (staged, held) before it was
        # made, so a call that made it is still in these sets unless it has finished.
        with self._lock:
            busy = set(self._staging) | set(self._held)
        return sorted(
            p for p in listed if p.name not in known and p.name not in busy and self._made_by_us(p)
        )

    def _made_by_us(self, path: Path) -> bool:
        """Only what this service made is ever removed: a real directory with our marker, or a
        staging directory a crash left before its marker was written. Anything else in
        snapshots/ (an operator's file, a symlink, a FIFO) is reported and left alone."""
        try:
            st = path.lstat()
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(st.st_mode) and (
            path.name.startswith(STAGING_PREFIX) or (path / MARKER).is_file()
        ):
            return True
        log.warning("not a snapshot of ours; left alone", extra={"path": str(path)})
        return False

    @contextlib.contextmanager
    def hold(self, sid: str, blocking: bool = True) -> Iterator[bool]:
        """SID's lock for one call that writes its directory; yields False (without it) when
        not BLOCKING and another call has it."""
        with self._lock:
            entry = self._held.setdefault(sid, _SnapshotLock())
            entry.users += 1
        acquired = entry.lock.acquire(blocking)
        try:
            yield acquired
        finally:
            if acquired:
                entry.lock.release()
            with self._lock:
                entry.users -= 1
                if not entry.users:
                    del self._held[sid]

    @contextlib.contextmanager
    def busy(self, sid: str) -> Iterator[None]:
        """Hold SID's lock to write its layer (Commit, Apply): NotFound if the snapshot went
        away, FailedPrecondition if it is no longer active, checked once the lock is ours."""
        with self.hold(sid):
            kind = self._kind_of(sid) if self._kind_of else Kind.ACTIVE
            if kind is None:
                raise NotFound(f"snapshot {sid} was removed")
            if kind != Kind.ACTIVE:
                raise FailedPrecondition(f"snapshot {sid} is not active (committed meanwhile)")
            yield

    def leftovers(self, sid: str, kind: Kind) -> list[Path]:
        """Garbage an interrupted call left inside live snapshot SID, removed under its lock
        (nothing while a call holds it)."""
        base = self.dir(sid)
        removed: list[Path] = []
        with self.hold(sid, blocking=False) as ours:
            if not ours or not base.is_dir():
                return []
            junk = [
                p for p in base.iterdir() if p.name.endswith(".tmp") or p.name.startswith("fs.old")
            ]
            if kind == Kind.COMMITTED and self.work(sid).exists():
                junk.append(self.work(sid))
            for path in junk:
                if path.is_dir() and not path.is_symlink():
                    remove_tree(path)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path)
        return removed

    def mount_layer(self, sid: str) -> Path:
        """fs/ of committed SID with its layer.erofs mounted (mounted once, kept until Remove)."""
        fs = self.fs(sid)
        with self._lock:
            if not hostmount.is_mountpoint(fs):
                fs.mkdir(mode=0o755, exist_ok=True)
                hostmount.mount_erofs(self.layer(sid), fs)
        return fs
