"""List filters over the real service: `~=` is RE2 (linear time, as containerd's Go regexp), an
invalid pattern is InvalidArgument with one line, and a pattern that makes a backtracking engine
run for ages returns the right answer at once while the server keeps serving."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from shim_integration.testbed.containerd_private import SnapshotterProcess, unmount_under
from snapshotter.errors import InvalidArgument
from snapshotter.service.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter.service.api.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from snapshotter.service.filters import compile_filters
from tests.support.helpers import require_root

DEADLINE = 30.0  # only so that a regression cannot hang CI; a correct List takes milliseconds
# Python's re needs ~2^40 steps for ^(a+)+$ on this name; RE2 needs one pass.
LONG_KEY = "ns/1/" + "a" * 40 + "!"


@pytest.fixture
def stub(tmp_path: Path) -> Iterator[pb_grpc.SnapshotsStub]:
    require_root()
    service = SnapshotterProcess(tmp_path / "root", tmp_path / "sn.sock", tmp_path / "sn.log")
    service.start()
    try:
        with grpc.insecure_channel(f"unix:{service.socket}") as channel:
            yield pb_grpc.SnapshotsStub(channel)
    finally:
        if service.proc is not None and service.proc.poll() is None:
            service.proc.kill()  # a frozen server (the old `re`) would not stop on SIGTERM soon
            service.proc.wait()
        unmount_under(tmp_path)


def listed(stub: pb_grpc.SnapshotsStub, *filters: str) -> list[str]:
    return sorted(
        i.name
        for r in stub.List(pb.ListSnapshotsRequest(filters=list(filters)), timeout=DEADLINE)
        for i in r.info
    )


def test_catastrophic_pattern_answers_and_server_keeps_serving(stub) -> None:
    stub.Prepare(pb.PrepareSnapshotRequest(key=LONG_KEY), timeout=DEADLINE)
    stub.Prepare(pb.PrepareSnapshotRequest(key="ns/1/" + "a" * 40), timeout=DEADLINE)
    # A leading `ns/1/` is not `a`: anchor past it, then the exponential part.
    assert listed(stub, r"name~=^ns/1/(a+)+$") == ["ns/1/" + "a" * 40]
    assert listed(stub, r"name~=^ns/1/(a+)+!$") == [LONG_KEY]
    assert listed(stub, r"name~=^ns/1/(a|aa)+$") == ["ns/1/" + "a" * 40]
    # the server was never blocked: another call answers straight after
    assert stub.Stat(pb.StatSnapshotRequest(key=LONG_KEY), timeout=DEADLINE).info.name == LONG_KEY


def test_long_filter_is_parsed_in_linear_time(stub) -> None:
    """A run of spaces inside a value made the selector parser itself quadratic (with Python's
    re); 200 KB of it must answer well inside the deadline."""
    spaced = "ns/1/x" + " " * 200_000 + "y"
    stub.Prepare(pb.PrepareSnapshotRequest(key="ns/1/x"), timeout=DEADLINE)
    assert listed(stub, f"name=={spaced}") == []
    assert listed(stub, f"name==ns/1/x{' ' * 200_000}") == ["ns/1/x"]  # trailing space: ignored
    assert stub.Stat(pb.StatSnapshotRequest(key="ns/1/x"), timeout=DEADLINE).info.name == "ns/1/x"


@pytest.mark.parametrize("pattern", ["(", "a**", "(?P<x", "[z-a]", "(?<!a)b"])
def test_invalid_regexp_is_invalid_argument(stub, pattern: str) -> None:
    stub.Prepare(pb.PrepareSnapshotRequest(key="ns/1/a"), timeout=DEADLINE)
    with pytest.raises(grpc.RpcError) as err:
        listed(stub, f'name~="{pattern}"')
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = err.value.details()
    assert details.startswith(f"invalid filter regexp {pattern!r}: ") and "\n" not in details
    assert "Traceback" not in details
    assert listed(stub) == ["ns/1/a"]  # nothing lost, the service still answers


def test_filters_on_labels_and_kinds(stub) -> None:
    stub.Prepare(
        pb.PrepareSnapshotRequest(key="ns/1/x", labels={"containerd.io/gc.root": "t1"}),
        timeout=DEADLINE,
    )
    stub.Prepare(pb.PrepareSnapshotRequest(key="ns/1/y", labels={"team": "b"}), timeout=DEADLINE)
    assert listed(stub, 'labels."containerd.io/gc.root"~=^t[0-9]$') == ["ns/1/x"]
    assert listed(stub, "labels.team==b", "name~=x$") == ["ns/1/x", "ns/1/y"]  # any string
    assert listed(stub, "kind==active,labels.team") == ["ns/1/y"]  # all selectors
    assert listed(stub, r"name~=\d") == ["ns/1/x", "ns/1/y"]  # Perl classes, as in Go


def test_compiled_once_per_list() -> None:
    with pytest.raises(InvalidArgument):
        compile_filters(["name~=("])  # at parse time, even with nothing to match
    match = compile_filters([r"name~=^(a+)+$"])
    assert match(lambda path: "a" * 100_000)
    assert not match(lambda path: "a" * 100_000 + "b")
