"""containerd.services.snapshots.v1.Snapshots over gRPC, served from a Snapshotter.

Keys arrive as containerd's metadata layer makes them (`<namespace>/<n>/<name>`) and are stored
as they are; the namespace (from the `containerd-namespace` header that 2.x sends, else the key's
first segment) only goes into the logs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import cast

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from snapshotter.service.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter.service.api.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from snapshotter.service.api.containerd.types import mount_pb2
from snapshotter.service.grpc_errors import rpc
from snapshotter.service.mounts import Mount
from snapshotter.service.namespaces import namespace_of
from snapshotter.service.snapshots import Snapshotter
from snapshotter.service.store import Info

log = logging.getLogger(__name__)
LIST_BATCH = 100


def to_pb_mounts(mounts: list[Mount]) -> list[mount_pb2.Mount]:
    return [
        mount_pb2.Mount(type=m.type, source=m.source, target=m.target, options=m.options)
        for m in mounts
    ]


def _timestamp(ns: int) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(ns)
    return ts


def to_pb_info(info: Info) -> pb.Info:
    # protoc's .pyi types an enum field as the enum class; the wire value is the int
    return pb.Info(
        name=info.name,
        parent=info.parent,
        kind=cast("pb.Kind", int(info.kind)),
        created_at=_timestamp(info.created),
        updated_at=_timestamp(info.updated),
        labels=info.labels,
    )


class SnapshotsService(pb_grpc.SnapshotsServicer):
    def __init__(self, snapshotter: Snapshotter) -> None:
        self.sn = snapshotter

    def _log(self, rpc_name: str, context: grpc.ServicerContext, key: str) -> None:
        log.debug(
            "rpc", extra={"rpc": rpc_name, "key": key, "namespace": namespace_of(context, key)}
        )

    @rpc
    def Prepare(self, request: pb.PrepareSnapshotRequest, context: grpc.ServicerContext):
        self._log("Prepare", context, request.key)
        mounts = self.sn.prepare(request.key, request.parent, dict(request.labels))
        return pb.PrepareSnapshotResponse(mounts=to_pb_mounts(mounts))

    @rpc
    def View(self, request: pb.ViewSnapshotRequest, context: grpc.ServicerContext):
        self._log("View", context, request.key)
        mounts = self.sn.view(request.key, request.parent, dict(request.labels))
        return pb.ViewSnapshotResponse(mounts=to_pb_mounts(mounts))

    @rpc
    def Mounts(self, request: pb.MountsRequest, context: grpc.ServicerContext):
        self._log("Mounts", context, request.key)
        return pb.MountsResponse(mounts=to_pb_mounts(self.sn.mounts(request.key)))

    @rpc
    def Commit(self, request: pb.CommitSnapshotRequest, context: grpc.ServicerContext):
        self._log("Commit", context, request.key)
        self.sn.commit(request.name, request.key, dict(request.labels), request.parent)
        return empty_pb2.Empty()

    @rpc
    def Remove(self, request: pb.RemoveSnapshotRequest, context: grpc.ServicerContext):
        self._log("Remove", context, request.key)
        self.sn.remove(request.key)
        return empty_pb2.Empty()

    @rpc
    def Stat(self, request: pb.StatSnapshotRequest, context: grpc.ServicerContext):
        self._log("Stat", context, request.key)
        return pb.StatSnapshotResponse(info=to_pb_info(self.sn.stat(request.key)))

    @rpc
    def Update(self, request: pb.UpdateSnapshotRequest, context: grpc.ServicerContext):
        self._log("Update", context, request.info.name)
        info = self.sn.update(
            request.info.name, dict(request.info.labels), list(request.update_mask.paths)
        )
        return pb.UpdateSnapshotResponse(info=to_pb_info(info))

    @rpc
    def _walk(self, request: pb.ListSnapshotsRequest, context: grpc.ServicerContext) -> list[Info]:
        return self.sn.walk(list(request.filters))

    def List(
        self, request: pb.ListSnapshotsRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ListSnapshotsResponse]:
        infos = self._walk(request, context)
        for i in range(0, len(infos), LIST_BATCH):
            yield pb.ListSnapshotsResponse(info=[to_pb_info(x) for x in infos[i : i + LIST_BATCH]])

    @rpc
    def Usage(self, request: pb.UsageRequest, context: grpc.ServicerContext):
        self._log("Usage", context, request.key)
        usage = self.sn.usage(request.key)
        return pb.UsageResponse(size=usage.size, inodes=usage.inodes)

    @rpc
    def Cleanup(self, request: pb.CleanupRequest, context: grpc.ServicerContext):
        self.sn.cleanup()
        return empty_pb2.Empty()
