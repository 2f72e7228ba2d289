"""The metadata store alone: containerd's snapshots/storage semantics and atomic transactions."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from snapshotter.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from snapshotter.service.store import Kind, Store, Usage


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "metadata.db")
    yield s
    s.close()


def create(store: Store, kind: Kind, key: str, parent: str = "", **labels: str) -> str:
    with store.transaction() as db:
        return store.create(db, kind, key, parent, labels).id


def commit(store: Store, key: str, name: str, **labels: str) -> str:
    with store.transaction() as db:
        return store.commit_active(db, key, name, Usage(10, 1), labels)


def test_chain_commit_keeps_id_and_parents(store: Store) -> None:
    a = create(store, Kind.ACTIVE, "ns/1/a")
    assert commit(store, "ns/1/a", "ns/2/A", x="1") == a
    b = create(store, Kind.ACTIVE, "ns/3/b", "ns/2/A")
    commit(store, "ns/3/b", "ns/4/B")
    view = create(store, Kind.VIEW, "ns/5/v", "ns/4/B")
    snap = store.get_snapshot("ns/5/v")
    assert (snap.id, snap.kind, snap.parent_ids) == (view, Kind.VIEW, [b, a])
    sid, info, usage = store.get_info("ns/2/A")
    assert (sid, info.kind, info.labels, usage) == (a, Kind.COMMITTED, {"x": "1"}, Usage(10, 1))
    assert store.get_info("ns/4/B")[1].parent == "ns/2/A"
    with pytest.raises(NotFound):
        store.get_info("ns/1/a")


def test_errors_are_containerds(store: Store) -> None:
    create(store, Kind.ACTIVE, "a")
    with pytest.raises(AlreadyExists):
        create(store, Kind.ACTIVE, "a")
    with pytest.raises(NotFound):
        create(store, Kind.ACTIVE, "b", "missing")
    with pytest.raises(InvalidArgument):  # parent not committed
        create(store, Kind.ACTIVE, "b", "a")
    with pytest.raises(InvalidArgument):
        create(store, Kind.COMMITTED, "c")
    commit(store, "a", "A")
    with pytest.raises(FailedPrecondition):  # committed: no Mounts
        store.get_snapshot("A")
    create(store, Kind.VIEW, "v", "A")
    with pytest.raises(FailedPrecondition):  # a view cannot be committed
        commit(store, "v", "V")
    with pytest.raises(AlreadyExists):
        commit(store, "v", "A")
    with pytest.raises(FailedPrecondition), store.transaction() as db:  # has a child
        store.remove(db, "A")
    with pytest.raises(InvalidArgument):
        store.update_info("A", {}, ["parent"])


def test_remove_then_parent(store: Store) -> None:
    create(store, Kind.ACTIVE, "a")
    commit(store, "a", "A")
    create(store, Kind.ACTIVE, "b", "A")
    with store.transaction() as db:
        assert store.remove(db, "b")[1] == Kind.ACTIVE
    with store.transaction() as db:
        assert store.remove(db, "A")[1] == Kind.COMMITTED
    assert store.walk() == []


def test_update_labels_like_containerd(store: Store) -> None:
    create(store, Kind.ACTIVE, "a", keep="1", drop="2")
    info = store.update_info("a", {"new": "3", "drop": ""}, ["labels.new", "labels.drop"])
    assert info.labels == {"keep": "1", "new": "3"}
    assert store.update_info("a", {"only": "4"}, []).labels == {"only": "4"}


def test_failed_transaction_leaves_nothing(store: Store) -> None:
    with pytest.raises(RuntimeError), store.transaction() as db:
        store.create(db, Kind.ACTIVE, "a", "", {"l": "v"})
        raise RuntimeError("crash inside the transaction")
    assert store.walk() == []
    assert create(store, Kind.ACTIVE, "a") is not None


def test_kill_mid_transaction_restarts_consistent(tmp_path: Path) -> None:
    """A process killed inside a write transaction leaves the database as it was before."""
    db = tmp_path / "metadata.db"
    script = f"""
import os, signal
from snapshotter.service.store import Kind, Store
s = Store(__import__("pathlib").Path({str(db)!r}))
with s.transaction() as db:
    s.create(db, Kind.ACTIVE, "kept", "", {{}})
with s.transaction() as db:
    s.create(db, Kind.ACTIVE, "lost", "", {{"a": "b"}})
    os.kill(os.getpid(), signal.SIGKILL)
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parents[2])
    assert proc.returncode == -9
    store = Store(db)
    assert [i.name for i in store.walk()] == ["kept"]
    with store.transaction() as tx:
        store.create(tx, Kind.ACTIVE, "lost", "", {})
    store.close()
