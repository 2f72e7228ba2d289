"""The committed generated code in snapshotter/service/api matches our `.proto` files."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from snapshotter.service.proto import generate


def _module_for(proto: str) -> str:
    return "snapshotter.service.api." + proto.removesuffix(".proto").replace("/", ".") + "_pb2"


def _without_json_names(fdp: descriptor_pb2.FileDescriptorProto) -> None:
    """--descriptor_set_out adds json_name to every field; the embedded descriptors have none."""
    pending = list(fdp.message_type)
    while pending:
        message = pending.pop()
        for field in message.field:
            field.ClearField("json_name")
        pending.extend(message.nested_type)


def test_generated_code_matches_proto_files(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools is in the [test] extra (.ci/setup)")
    out = tmp_path / "set.pb"
    generate.run_protoc(tmp_path, [f"--descriptor_set_out={out}"])
    fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    assert {f.name for f in fresh.file} == set(generate.proto_files())
    for want in fresh.file:
        _without_json_names(want)
        module = importlib.import_module(_module_for(want.name))
        got = descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb)
        assert got == want, f"{want.name}: run python -m snapshotter.service.proto.generate"


def test_service_method_paths_are_containerds() -> None:
    from snapshotter.service.api.containerd.services.snapshots.v1 import snapshots_pb2

    service = snapshots_pb2.DESCRIPTOR.services_by_name["Snapshots"]
    assert service.full_name == "containerd.services.snapshots.v1.Snapshots"
    assert [m.name for m in service.methods] == [
        "Prepare",
        "View",
        "Mounts",
        "Commit",
        "Remove",
        "Stat",
        "Update",
        "List",
        "Usage",
        "Cleanup",
    ]
