"""Store.open_read_only: what `manifest verify --snapshot` reads beside a running service,
without a schema write, a pragma, a chmod or a lock the service would wait for."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from snapshotter.errors import NotFound
from snapshotter.service.store import Kind, Store, Usage


def _chain(store: Store) -> str:
    """Two committed layers and an active snapshot on top; the active one's key."""
    parent = ""
    for n in (1, 2):
        with store.transaction() as db:
            store.create(db, Kind.ACTIVE, f"ns/{n}/extract", parent, {})
            store.commit_active(db, f"ns/{n}/extract", f"ns/{n}/layer", Usage(0, 0), {})
        parent = f"ns/{n}/layer"
    with store.transaction() as db:
        store.create(db, Kind.ACTIVE, "ns/3/rootfs", parent, {})
    return "ns/3/rootfs"


def test_read_only_store_reads_beside_a_writer_and_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "metadata.db"
    writer = Store(path)
    try:
        key = _chain(writer)
        assert writer.ancestors(key) == ["2", "1"]
        os.chmod(path, 0o640)  # a mode the writer would take back; a reader must not
        before = {p.name: (p.stat().st_mode, p.read_bytes()) for p in tmp_path.iterdir()}
        with writer.transaction():  # the service holds the write lock meanwhile
            reader = Store.open_read_only(path)
            try:
                assert reader.ancestors(key) == ["2", "1"]
                assert reader.ancestors("ns/1/layer") == []
                with pytest.raises(NotFound):
                    reader.ancestors("ns/9/none")
                with (
                    pytest.raises(sqlite3.OperationalError, match="readonly"),
                    reader.transaction() as db,
                ):
                    db.execute("DELETE FROM labels")
            finally:
                reader.close()
        after = {p.name: (p.stat().st_mode, p.read_bytes()) for p in tmp_path.iterdir()}
        assert after == before
    finally:
        writer.close()


def test_read_only_store_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(sqlite3.Error):
        Store.open_read_only(tmp_path / "metadata.db")
    assert not list(tmp_path.iterdir())
    (tmp_path / "metadata.db").write_bytes(b"")  # an empty file: no schema, not a store
    with pytest.raises(sqlite3.Error, match="no such table"):
        Store.open_read_only(tmp_path / "metadata.db")
    assert [p.name for p in tmp_path.iterdir()] == ["metadata.db"]
