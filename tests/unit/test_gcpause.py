"""The collector pause around tree builds (snapshotter.gcpause).

What a user of the library relies on: a conversion or a merge leaves the process's garbage
collector as it found it, on success and on error, with builds nested or in several threads
at once; and the collector really is off while a tree is built (else the pause buys nothing).
"""

from __future__ import annotations

import gc
import threading

import pytest

from snapshotter.errors import EpError
from snapshotter.fsmeta import merge
from snapshotter.fsmeta.merge import merge_layers
from snapshotter.gcpause import collector_paused
from snapshotter.ingest import tar_import
from snapshotter.ingest.convert import convert_layer
from tests.support.layers import Entry, write_tar


@pytest.fixture(autouse=True)
def _collector_on():
    gc.enable()
    yield
    gc.enable()


def test_nested_and_overlapping_pauses_resume_once_the_last_ends():
    with collector_paused():
        assert not gc.isenabled()
        with collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the outer pause still holds
    assert gc.isenabled()

    inside, release = threading.Event(), threading.Event()

    def other() -> None:
        with collector_paused():
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=other)
    with collector_paused():
        thread.start()
        assert inside.wait(10)
    assert not gc.isenabled()  # the other thread's pause outlives this one
    release.set()
    thread.join(10)
    assert gc.isenabled()


def test_a_collector_turned_off_by_the_caller_stays_off():
    gc.disable()
    with collector_paused():
        pass
    assert not gc.isenabled()


def test_conversion_and_merge_build_their_trees_paused_and_resume(tmp_path, monkeypatch):
    seen: list[bool] = []
    build = tar_import.import_tar

    def spying_import(*args, **kwargs):
        seen.append(gc.isenabled())
        return build(*args, **kwargs)

    monkeypatch.setattr("snapshotter.ingest.convert.import_tar", spying_import)
    layer = tmp_path / "l.erofs"
    convert_layer(
        write_tar(tmp_path / "l.tar", [Entry("a", data=b"x"), Entry("b", data=b"x")]), layer
    )
    assert seen == [False]
    assert gc.isenabled()

    merged = merge.build_merged_tree

    def spying_merge(*args, **kwargs):
        seen.append(gc.isenabled())
        return merged(*args, **kwargs)

    monkeypatch.setattr(merge, "build_merged_tree", spying_merge)
    merge_layers([layer, layer], tmp_path / "m.fsmeta")
    assert seen == [False, False]
    assert gc.isenabled()


def test_a_failed_conversion_or_merge_resumes_the_collector(tmp_path):
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"not a tar" * 100)
    with pytest.raises(EpError):
        convert_layer(bad, tmp_path / "x.erofs")
    assert gc.isenabled()
    with pytest.raises(EpError):
        merge_layers([bad], tmp_path / "m.fsmeta")
    assert gc.isenabled()
