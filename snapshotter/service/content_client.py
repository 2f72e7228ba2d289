"""Client of containerd's Content service: a blob of its content store as a readable stream.

Every call carries the `containerd-namespace` metadata header (containerd's content store is
per namespace; `namespaces` declares it); Read is a server stream of chunks, adapted to a
buffered binary file. Failures become one-line errdefs errors naming containerd's address:
NotFound, Unavailable (nothing answers there), or the code containerd sent.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import grpc

from snapshotter import errors
from snapshotter.errors import EpError
from snapshotter.service.api.containerd.services.content.v1 import content_pb2, content_pb2_grpc
from snapshotter.service.namespaces import namespace_metadata
from snapshotter.service.workers import Cancellation

BUFFER = 1 << 20


class _ChunkStream(io.RawIOBase):
    """Raw reads over an iterator of byte chunks."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._left = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        while not self._left:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._left = memoryview(chunk)
        n = min(len(buffer), len(self._left))
        buffer[:n] = self._left[:n]
        self._left = self._left[n:]
        return n


class ContentClient:
    """containerd's content store at ADDRESS (its gRPC socket)."""

    def __init__(self, address: Path) -> None:
        self.address = address
        self._channel = grpc.insecure_channel(f"unix:{address}")
        self._stub = content_pb2_grpc.ContentStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def size(self, namespace: str, digest: str) -> int:
        try:
            reply = self._stub.Info(
                content_pb2.InfoRequest(digest=digest), metadata=namespace_metadata(namespace)
            )
        except grpc.RpcError as exc:
            raise self._translate(exc, digest) from None
        return reply.info.size

    def open(self, namespace: str, digest: str) -> io.BufferedReader:
        """The blob DIGEST as a binary stream (errors surface as NotFound / RpcError on read)."""
        call = self._stub.Read(
            content_pb2.ReadContentRequest(digest=digest), metadata=namespace_metadata(namespace)
        )

        def chunks() -> Iterator[bytes]:
            try:
                for reply in call:
                    yield reply.data
            except grpc.RpcError as exc:
                raise self._translate(exc, digest) from None

        return io.BufferedReader(_ChunkStream(chunks()), BUFFER)

    def copy_to(self, namespace: str, digest: str, fd: int, cancel: Cancellation) -> None:
        """Write the blob DIGEST into file descriptor FD (a conversion worker's pipe), chunk
        by chunk as containerd sends them; CANCEL stops the read stream too."""
        call = self._stub.Read(
            content_pb2.ReadContentRequest(digest=digest), metadata=namespace_metadata(namespace)
        )
        detach = cancel.on_cancel(call.cancel)
        try:
            for reply in call:
                view = memoryview(reply.data)
                while view:
                    view = view[os.write(fd, view) :]
        except grpc.RpcError as exc:
            if cancel.cancelled:
                return  # the job reports the cancel
            raise self._translate(exc, digest) from None
        finally:
            detach()

    def _translate(self, exc: grpc.RpcError, digest: str) -> EpError:
        code = exc.code()
        details = " ".join((exc.details() or "").split())
        if code == grpc.StatusCode.NOT_FOUND:
            return errors.NotFound(f"content {digest} not found in containerd at {self.address}")
        if code == grpc.StatusCode.UNAVAILABLE:
            reason = details.rsplit("error: ", 1)[-1]  # gRPC's text repeats the address
            return errors.Unavailable(
                f"containerd's content store at {self.address} is unreachable: {reason}"
            )
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return errors.InvalidArgument(
                f"containerd at {self.address} refused reading {digest}: {details}"
            )
        return EpError(
            f"reading {digest} from containerd at {self.address}: {code.name}: {details}"
        )
