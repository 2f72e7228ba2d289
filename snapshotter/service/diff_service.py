"""containerd.services.diff.v1.Diff: Apply writes a layer straight into our snapshot as EROFS.

containerd (>= 1.7, proxy plugin of type "diff") calls Apply with the compressed layer's
descriptor and the mounts our Prepare returned. When those mounts are one of our active
snapshots, the blob is read from containerd's content store and converted in one pass into
the snapshot's layer.erofs (+ dm-verity); Commit then finds it and converts nothing. Anything
else (mounts that are not ours, media types we do not read, payloads such as decryption
parameters) is UNIMPLEMENTED, and containerd falls back to its walking differ. Native EROFS
layers (NATIVE_EROFS_LAYERS) are stored as they are, after checking them: that is not a
conversion, and the log says so ("stored native EROFS layer", counted in `native_layers`, while
`conversions` counts only tar layers converted).

With `layer_caches` configured, a layer whose diffID (from the snapshot's labels:
layer_cache.py) has a cache entry is staged from it instead: the blob is not read from the
content store and nothing is converted. An entry that fails its checks is logged as a warning
and the layer converted as if there were none.

With a `WorkerPool` (serve always gives one: workers.py) conversions run in worker processes,
the blob streamed to them from the content store; a cancelled Apply (the client gone) kills
its worker and leaves no temp output.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from snapshotter.errors import InvalidArgument, Unimplemented
from snapshotter.service import layer_build
from snapshotter.service.api.containerd.services.diff.v1 import diff_pb2, diff_pb2_grpc
from snapshotter.service.api.containerd.types import descriptor_pb2
from snapshotter.service.content_client import ContentClient
from snapshotter.service.grpc_errors import rpc
from snapshotter.service.layer_cache import CacheEntryError
from snapshotter.service.namespaces import namespace_of
from snapshotter.service.snapshots import Snapshotter
from snapshotter.service.store import Kind
from snapshotter.service.workers import (
    Cancellation,
    WorkerPool,
    native_job,
    tar_job,
)

if TYPE_CHECKING:
    from snapshotter.ingest.convert import ConvertResult

log = logging.getLogger(__name__)

LAYER_MEDIA_TYPES = {
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
}
UNCOMPRESSED = "application/vnd.oci.image.layer.v1.tar"
# containerd 2.3+'s name (core/images/mediatypes.go MediaTypeErofsLayer), the only one its own
# erofs differ takes from 2.3 on; stored as it is.
EROFS_LAYER = "application/vnd.erofs.layer.v1"
# The same native layer under the OCI layer prefix. containerd up to 2.2 unpacks only layers
# its images.IsLayerType knows (the "application/vnd.oci.image.layer." prefix and Docker's tar
# types): an image of EROFS_LAYER layers pulls, but its layers never reach a differ (1.7's
# ctr: "mismatched image rootfs and manifest layers"; 2.1's transfer service unpacks nothing).
# Under this name they are layers to every containerd (and 2.1/2.2's erofs differ takes it:
# a ".erofs" suffix), and still none a walking differ reads. docs/publish.md, "Media type".
OCI_EROFS_LAYER = "application/vnd.oci.image.layer.v1.erofs"
NATIVE_EROFS_LAYERS = frozenset({EROFS_LAYER, OCI_EROFS_LAYER})
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128}")


def upper_dir(mounts: list) -> Path | None:
    """The directory a layer is unpacked into: the bind source or the overlay upperdir, in
    either mount style (mounts.py): a classic single mount, or containerd-2.3's erofs lowers
    followed by a `format/mkdir/overlay`."""
    if not mounts:
        return None
    m = mounts[-1]
    if len(mounts) == 1 and m.type == "bind":
        return Path(m.source)
    if (m.type == "overlay" and len(mounts) == 1) or m.type == "format/mkdir/overlay":
        for option in m.options:
            if option.startswith("upperdir="):
                return Path(option.removeprefix("upperdir="))
    return None


class DiffService(diff_pb2_grpc.DiffServicer):
    def __init__(
        self,
        snapshotter: Snapshotter,
        content: ContentClient,
        workers: WorkerPool | None = None,
        content_dir: Path | None = None,
    ) -> None:
        self.sn = snapshotter
        self.content = content
        self.workers = workers  # None: convert in this process (one interpreter lock)
        self.content_dir = content_dir  # containerd's content store on this host, if known
        self._count_lock = threading.Lock()
        self.conversions = 0  # tar layers converted
        self.native_layers = 0  # native EROFS layers stored as they are (not a conversion)

    def _our_snapshot(self, mounts: list) -> tuple[str, str]:
        """(id, key) of the active snapshot of ours that MOUNTS unpack into."""
        upper = upper_dir(mounts)
        snapshots = self.sn.layout.snapshots
        if upper is None or upper.name != "fs" or upper.parent.parent != snapshots:
            raise Unimplemented("mounts are not an erofs-py snapshot")
        sid = upper.parent.name
        key, kind = self.sn.store.id_map().get(sid, ("", None))
        if kind != Kind.ACTIVE or not self.sn.layout.is_ours(sid):
            raise Unimplemented(f"snapshot directory {sid} is not an active erofs-py snapshot")
        return sid, key

    @rpc
    def Apply(self, request: diff_pb2.ApplyRequest, context: grpc.ServicerContext):
        desc = request.diff
        if desc.media_type not in LAYER_MEDIA_TYPES | NATIVE_EROFS_LAYERS:
            raise Unimplemented(f"media type {desc.media_type} is not a tar layer")
        if request.payloads:
            raise Unimplemented("apply payloads (e.g. decryption) are not supported")
        sid, key = self._our_snapshot(list(request.mounts))
        namespace = namespace_of(context, key)
        directory = self.sn.layout.dir(sid)
        cached = self._cache_entry(key)
        cancel = Cancellation()  # the client going away stops the worker's conversion
        context.add_callback(cancel.cancel)
        with self.sn.layout.busy(sid):
            try:
                meta = layer_build.publish_layer(
                    directory,
                    lambda out: self._produce(namespace, desc, out, key, cached, cancel),
                )
            except OSError as exc:
                if exc.filename is None:  # a write into an open file: say where it was
                    exc.filename = str(directory)
                raise
        log.info(
            "applied",
            extra={
                "key": key,
                "id": sid,
                "digest": desc.digest,
                "diff_id": meta.diff_id,
                "root_hash": meta.root_hash,
            },
        )
        applied_type = desc.media_type if desc.media_type in NATIVE_EROFS_LAYERS else UNCOMPRESSED
        return diff_pb2.ApplyResponse(
            applied=descriptor_pb2.Descriptor(media_type=applied_type, digest=meta.diff_id)
        )

    def _cache_entry(self, key: str) -> tuple[str, Path] | None:
        """(diffID, cache blob) for the layer active snapshot KEY unpacks, or None."""
        cache = self.sn.layer_cache
        if not cache:
            return None
        _, info, _ = self.sn.store.get_info(key)
        diff_id = cache.diff_id_of(key, info.labels, info.parent)
        blob = cache.find(diff_id) if diff_id else None
        if diff_id is None or blob is None:
            log.debug("layer cache miss", extra={"key": key, "diff_id": diff_id or ""})
            return None
        return diff_id, blob

    def _produce(
        self,
        namespace: str,
        desc: descriptor_pb2.Descriptor,
        out: Path,
        key: str,
        cached: tuple[str, Path] | None,
        cancel: Cancellation,
    ) -> layer_build.LayerMeta:
        """The layer at OUT: from the cache entry CACHED when it passes its checks, else
        converted from the content store."""
        if cached is not None:
            diff_id, blob = cached
            try:
                meta = self.sn.layer_cache.stage(
                    blob, out, diff_id, self.sn.layer_verity, self.sn.limits.max_image_bytes
                )
            except CacheEntryError as exc:
                log.warning(
                    "layer cache entry refused, converting the layer",
                    extra={
                        "key": key,
                        "digest": desc.digest,
                        "diff_id": diff_id,
                        "reason": str(exc),
                    },
                )
            else:
                log.info(
                    "layer from cache",
                    extra={
                        "key": key,
                        "digest": desc.digest,
                        "diff_id": diff_id,
                        "blob": str(blob),
                        "cache_hits": self.sn.layer_cache.hits,
                        "conversions": self.conversions,
                    },
                )
                return meta
        if desc.media_type in NATIVE_EROFS_LAYERS:
            return self._store_native(namespace, desc, out, key, cancel)
        return self._convert(namespace, desc, out, key, cancel)

    def _in_worker(
        self,
        request: dict,
        namespace: str,
        desc: descriptor_pb2.Descriptor,
        cancel: Cancellation,
    ) -> layer_build.LayerMeta:
        """REQUEST run by a conversion worker, the blob streamed to it from the content
        store through a pipe."""
        assert self.workers is not None
        blob = self._blob_file(desc.digest)
        if blob is not None:
            try:
                reply = self.workers.run(request, source_fd=blob, cancel=cancel)
            finally:
                os.close(blob)
        else:
            reply = self.workers.run(
                request,
                feed=lambda fd: self.content.copy_to(namespace, desc.digest, fd, cancel),
                cancel=cancel,
            )
        reply.pop("maxrss_kib")
        got = reply.pop("compressed_digest")
        if got != desc.digest:
            raise InvalidArgument(f"content {desc.digest} read as {got}")
        return layer_build.LayerMeta(**reply)

    def _blob_file(self, digest: str) -> int | None:
        """A read-only descriptor of DIGEST's file in containerd's content store
        (blobs/<algorithm>/<hex>, committed content is never rewritten), or None: stream it.
        The conversion still checks the bytes against DIGEST."""
        if self.content_dir is None or not _DIGEST.fullmatch(digest):
            return None
        algorithm, _, hexpart = digest.partition(":")
        try:
            return os.open(self.content_dir / "blobs" / algorithm / hexpart, os.O_RDONLY)
        except OSError:
            return None

    def _store_native(
        self,
        namespace: str,
        desc: descriptor_pb2.Descriptor,
        out: Path,
        key: str,
        cancel: Cancellation,
    ) -> layer_build.LayerMeta:
        """A native EROFS layer from the content store, checked and stored with its verity
        tree: the bytes are the publisher's, nothing is converted."""
        from snapshotter.ingest.convert import import_erofs_image

        with self._count_lock:
            self.native_layers += 1
            native_layers, conversions = self.native_layers, self.conversions
        if self.workers is not None:
            request = native_job(out, desc.digest, self.sn.layer_verity)
            meta = self._in_worker(request, namespace, desc, cancel)
        else:
            with self.content.open(namespace, desc.digest) as blob:
                result = import_erofs_image(
                    blob, out, expected_digest=desc.digest, verity=self.sn.layer_verity
                )
            meta = self._meta(desc, result)
        log.info(
            "stored native EROFS layer",
            extra={
                "key": key,
                "digest": desc.digest,
                "media_type": desc.media_type,
                "native_layers": native_layers,
                "conversions": conversions,
            },
        )
        return meta

    def _convert(
        self,
        namespace: str,
        desc: descriptor_pb2.Descriptor,
        out: Path,
        key: str,
        cancel: Cancellation,
    ) -> layer_build.LayerMeta:
        from snapshotter.ingest.convert import convert_layer

        with self._count_lock:
            self.conversions += 1
            conversions = self.conversions
        log.info(
            "converting layer",
            extra={
                "key": key,
                "digest": desc.digest,
                "media_type": desc.media_type,
                "conversions": conversions,
            },
        )
        if self.workers is not None:
            request = tar_job(out, self.sn.layer_verity, self.sn.limits, self.sn.tail_packing)
            return self._in_worker(request, namespace, desc, cancel)
        with self.content.open(namespace, desc.digest) as blob:
            result = convert_layer(
                blob,
                out,
                verity=self.sn.layer_verity,
                blob_digest=True,
                limits=self.sn.limits,
                tail_packing=self.sn.tail_packing,
            )
        return self._meta(desc, result)

    @staticmethod
    def _meta(desc: descriptor_pb2.Descriptor, result: ConvertResult) -> layer_build.LayerMeta:
        if result.compressed_digest != desc.digest:
            raise InvalidArgument(f"content {desc.digest} read as {result.compressed_digest}")
        return layer_build.layer_meta(result, diff_id=result.diff_id or "")

    def Diff(self, request: diff_pb2.DiffRequest, context: grpc.ServicerContext):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "erofs-py does not create diffs")
