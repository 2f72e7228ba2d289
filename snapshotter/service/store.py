"""Snapshot metadata in SQLite, in the manner of containerd's `snapshots/storage` package.

One row per snapshot: a numeric id that never changes (it names the snapshot's directory and
survives Commit, which renames the key), the key, the kind, the parent's id, timestamps, usage,
and its labels in a second table. The database runs in WAL mode with synchronous=FULL and every
state change is one `BEGIN IMMEDIATE` transaction, so a process killed at any instant leaves
either the old or the new state. Ids come from AUTOINCREMENT and are never reused while the
database lives (a rolled-back id can come back, which `Layout.claim` handles).

The database and its -wal/-shm files are mode 0600 whatever the directory's mode or the umask
(systemd's StateDirectory= makes 0755 directories): SQLite gives the -wal and -shm files the
mode of the database file, which is created 0600 before SQLite opens it.

`Store.open_read_only` is for readers beside a running service (`manifest verify
--snapshot`): SQLite's `mode=ro`, no schema, no pragmas, no chmod, deferred transactions, so
the service is neither blocked nor changed.
"""

from __future__ import annotations

import contextlib
import enum
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from snapshotter.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    key       TEXT NOT NULL UNIQUE,
    kind      INTEGER NOT NULL,
    parent_id INTEGER REFERENCES snapshots(id),
    created   INTEGER NOT NULL,
    updated   INTEGER NOT NULL,
    size      INTEGER NOT NULL DEFAULT 0,
    inodes    INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent_id);
CREATE TABLE IF NOT EXISTS labels (
    snapshot_id INTEGER NOT NULL REFERENCES snapshots(id) ON DELETE CASCADE,
    name        TEXT NOT NULL,
    value       TEXT NOT NULL,
    PRIMARY KEY (snapshot_id, name)
);
"""


class StoreClosed(Unavailable):
    """A call reached the store after the service closed it (it is shutting down)."""


class Kind(enum.IntEnum):
    """Same numbers as containerd.services.snapshots.v1.Kind."""

    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3


@dataclass(frozen=True)
class Info:
    """What Stat returns: containerd's snapshots.Info. Times are ns since the epoch (UTC)."""

    name: str
    kind: Kind
    parent: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    created: int = 0
    updated: int = 0


@dataclass(frozen=True)
class Usage:
    size: int = 0
    inodes: int = 0


@dataclass(frozen=True)
class Snapshot:
    """An active or view snapshot and the ids of its parents, nearest first."""

    id: str
    kind: Kind
    parent_ids: list[str]


class Store:
    """The metadata database. Thread-safe: one connection, one transaction at a time."""

    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        self._lock = threading.RLock()
        self._closed = False
        self.read_only = read_only
        if read_only:
            # A read transaction needs no lock a writer waits for; BEGIN IMMEDIATE would ask
            # for the write lock, which a read-only connection cannot take.
            self._begin = "BEGIN"
            self._db = sqlite3.connect(
                f"{Path(path).absolute().as_uri()}?mode=ro",
                uri=True,
                isolation_level=None,
                check_same_thread=False,
                timeout=10,
            )
            return
        self._begin = "BEGIN IMMEDIATE"
        _make_private(path)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)  # idempotent; executescript commits by itself

    @classmethod
    def open_read_only(cls, path: Path) -> Store:
        """An existing database, for reading only (sqlite3.Error if it cannot be read)."""
        store = cls(path, read_only=True)
        try:
            store._db.execute("SELECT 1 FROM snapshots LIMIT 1")
        except sqlite3.Error:
            store.close()
            raise
        return store

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._db.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic step: BEGIN IMMEDIATE .. COMMIT, ROLLBACK on any exception (read-only:
        one consistent read, BEGIN .. COMMIT)."""
        with self._lock:
            if self._closed:  # a call that outlived the server's grace period
                raise StoreClosed("the metadata store is closed: the service is stopping")
            self._db.execute(self._begin)
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # -- reads ---------------------------------------------------------------------------------

    def _row(self, db: sqlite3.Connection, key: str) -> tuple:
        row = db.execute(
            "SELECT s.id, s.kind, p.key, s.created, s.updated, s.size, s.inodes, s.parent_id"
            " FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id WHERE s.key = ?",
            (key,),
        ).fetchone()
        if row is None:
            raise NotFound(f"snapshot {key!r} does not exist")
        return row

    def _labels(self, db: sqlite3.Connection, sid: int) -> dict[str, str]:
        rows = db.execute("SELECT name, value FROM labels WHERE snapshot_id = ?", (sid,))
        return dict(rows.fetchall())

    def _info(self, db: sqlite3.Connection, key: str, row: sqlite3.Row | tuple) -> Info:
        sid, kind, parent, created, updated = row[:5]
        return Info(key, Kind(kind), parent or "", self._labels(db, sid), created, updated)

    def get_info(self, key: str) -> tuple[str, Info, Usage]:
        """(id, info, stored usage) of KEY; NotFound if there is none."""
        with self.transaction() as db:
            row = self._row(db, key)
            return str(row[0]), self._info(db, key, row), Usage(row[5], row[6])

    def _parent_ids(self, db: sqlite3.Connection, parent_id: int | None) -> list[str]:
        ids: list[str] = []
        while parent_id is not None:
            ids.append(str(parent_id))
            found = db.execute("SELECT parent_id FROM snapshots WHERE id = ?", (parent_id,))
            parent_id = found.fetchone()[0]
        return ids

    def get_snapshot(self, key: str) -> Snapshot:
        """Active or view snapshot KEY with its parent chain; FailedPrecondition if committed."""
        with self.transaction() as db:
            row = self._row(db, key)
            if row[1] not in (Kind.ACTIVE, Kind.VIEW):
                raise FailedPrecondition(f"snapshot {key!r} is not active or view")
            return Snapshot(str(row[0]), Kind(row[1]), self._parent_ids(db, row[7]))

    def ancestors(self, key: str) -> list[str]:
        """The ids of snapshot KEY's parent, its parent's, ..., nearest first (any kind of
        snapshot); NotFound if there is none."""
        with self.transaction() as db:
            return self._parent_ids(db, self._row(db, key)[7])

    def committed_chain(self, key: str) -> list[str]:
        """Committed snapshot KEY's id and its ancestors' ids, nearest first."""
        with self.transaction() as db:
            return self._parent_ids(db, self._committed_parent(db, key))

    def walk(self) -> list[Info]:
        """Every snapshot's info, in id order."""
        with self.transaction() as db:
            keys = [k for (k,) in db.execute("SELECT key FROM snapshots ORDER BY id")]
            return [self._info(db, k, self._row(db, k)) for k in keys]

    def id_map(self, db: sqlite3.Connection | None = None) -> dict[str, tuple[str, Kind]]:
        """id -> (key, kind) of every snapshot (inside the caller's transaction DB, if given)."""
        if db is None:
            with self.transaction() as db:
                return self.id_map(db)
        rows = db.execute("SELECT id, key, kind FROM snapshots").fetchall()
        return {str(i): (k, Kind(kd)) for i, k, kd in rows}

    def chains_labelled(self, name: str, value: str) -> list[list[str]]:
        """The parent ids (nearest first) of every active or view snapshot whose label NAME
        is VALUE, read in one transaction."""
        with self.transaction() as db:
            rows = db.execute(
                "SELECT s.parent_id FROM snapshots s JOIN labels l ON l.snapshot_id = s.id"
                " WHERE s.kind != ? AND l.name = ? AND l.value = ?",
                (int(Kind.COMMITTED), name, value),
            ).fetchall()
            return [self._parent_ids(db, parent_id) for (parent_id,) in rows]

    def kind_of(self, sid: str) -> Kind | None:
        """The kind of the snapshot with id SID now, or None if there is no such snapshot."""
        with self.transaction() as db:
            row = db.execute("SELECT kind FROM snapshots WHERE id = ?", (int(sid),)).fetchone()
            return None if row is None else Kind(row[0])

    # -- writes --------------------------------------------------------------------------------

    def _put_labels(self, db: sqlite3.Connection, sid: int, labels: dict[str, str]) -> None:
        """Replace SID's labels; an empty value means no label (as containerd's boltutil)."""
        db.execute("DELETE FROM labels WHERE snapshot_id = ?", (sid,))
        db.executemany(
            "INSERT INTO labels (snapshot_id, name, value) VALUES (?, ?, ?)",
            [(sid, k, v) for k, v in sorted(labels.items()) if v],
        )

    def _committed_parent(self, db: sqlite3.Connection, parent: str) -> int | None:
        if not parent:
            return None
        row = db.execute("SELECT id, kind FROM snapshots WHERE key = ?", (parent,)).fetchone()
        if row is None:
            raise NotFound(f"parent {parent!r} does not exist")
        if row[1] != Kind.COMMITTED:
            raise InvalidArgument(f"parent {parent!r} is not a committed snapshot")
        return row[0]

    def create(
        self, db: sqlite3.Connection, kind: Kind, key: str, parent: str, labels: dict[str, str]
    ) -> Snapshot:
        """Insert an active or view snapshot inside the caller's transaction DB."""
        if kind not in (Kind.ACTIVE, Kind.VIEW):
            raise InvalidArgument(f"snapshot kind {kind!r} invalid: only active or view")
        if not key:
            raise InvalidArgument("snapshot key must not be empty")
        parent_id = self._committed_parent(db, parent)
        if db.execute("SELECT 1 FROM snapshots WHERE key = ?", (key,)).fetchone():
            raise AlreadyExists(f"snapshot {key!r} already exists")
        now = time.time_ns()
        cur = db.execute(
            "INSERT INTO snapshots (key, kind, parent_id, created, updated) VALUES (?, ?, ?, ?, ?)",
            (key, int(kind), parent_id, now, now),
        )
        sid = int(cur.lastrowid or 0)
        self._put_labels(db, sid, labels)
        return Snapshot(str(sid), kind, self._parent_ids(db, parent_id))

    def commit_active(
        self,
        db: sqlite3.Connection,
        key: str,
        name: str,
        usage: Usage,
        labels: dict[str, str],
        parent: str = "",
    ) -> str:
        """Turn active KEY into committed NAME (same id) inside the caller's transaction DB."""
        if db.execute("SELECT 1 FROM snapshots WHERE key = ?", (name,)).fetchone():
            raise AlreadyExists(f"committed snapshot {name!r} already exists")
        row = self._row(db, key)
        if row[1] != Kind.ACTIVE:
            raise FailedPrecondition(f"snapshot {key!r} is not active")
        if parent and parent != (row[2] or ""):
            raise InvalidArgument(f"cannot change parent of active snapshot {key!r} on commit")
        now = time.time_ns()
        db.execute(
            "UPDATE snapshots SET key = ?, kind = ?, created = ?, updated = ?, size = ?,"
            " inodes = ? WHERE id = ?",
            (name, int(Kind.COMMITTED), now, now, usage.size, usage.inodes, row[0]),
        )
        self._put_labels(db, row[0], labels)
        return str(row[0])

    def remove(self, db: sqlite3.Connection, key: str) -> tuple[str, Kind]:
        """Delete KEY inside the caller's transaction DB; FailedPrecondition if it has children."""
        row = self._row(db, key)
        if db.execute("SELECT 1 FROM snapshots WHERE parent_id = ?", (row[0],)).fetchone():
            raise FailedPrecondition(f"cannot remove snapshot {key!r} with children")
        db.execute("DELETE FROM snapshots WHERE id = ?", (row[0],))
        return str(row[0]), Kind(row[1])

    def update_info(self, key: str, labels: dict[str, str], paths: list[str]) -> Info:
        """Replace labels (no PATHS, or "labels") or single `labels.NAME` entries of KEY."""
        with self.transaction() as db:
            row = self._row(db, key)
            current = self._labels(db, row[0])
            for path in paths or ["labels"]:
                if path == "labels":
                    current = dict(labels)
                elif path.startswith("labels."):
                    name = path.removeprefix("labels.")
                    if name in labels:
                        current[name] = labels[name]
                    else:
                        current.pop(name, None)
                else:
                    raise InvalidArgument(f"cannot update {path!r} field on snapshot {key!r}")
            db.execute("UPDATE snapshots SET updated = ? WHERE id = ?", (time.time_ns(), row[0]))
            self._put_labels(db, row[0], current)
            return self._info(db, key, self._row(db, key))


def _make_private(path: Path) -> None:
    """Create PATH 0600 if missing, and take group/other access from it and its -wal/-shm."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    for suffix in ("-wal", "-shm", "-journal"):
        with contextlib.suppress(FileNotFoundError):
            os.chmod(f"{path}{suffix}", 0o600, follow_symlinks=False)
