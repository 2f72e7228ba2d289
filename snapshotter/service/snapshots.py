"""The snapshotter: containerd's Snapshotter semantics over the Store and the Layout.

Every call is one metadata transaction plus file steps ordered so that a crash between any two
of them leaves garbage only (see layout.py and layer_build.py); `cleanup` removes it and runs at
start-up. Commit converts the unpacked fs/ into layer.erofs + dm-verity outside any transaction
(unless our differ already wrote the layer), then one transaction makes it committed.

Calls on one snapshot's directory (Commit, Apply, Remove) hold its lock in the Layout, so a
second Commit of a key waits for the first and then finds the key gone (NotFound); a committed
layer is never rebuilt. Cleanup's orphan scan runs inside one metadata transaction, which
creation's claim of its directory also needs, so a new snapshot is never taken for an orphan.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from snapshotter.erofs.limits import DEFAULT_LIMITS, Limits
from snapshotter.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from snapshotter.fsutil import disk_usage
from snapshotter.service import layer_build, vm_mode
from snapshotter.service.filters import compile_filters
from snapshotter.service.layer_cache import (
    CHAIN_ID_LABEL,
    CacheEntryError,
    LayerCache,
    parse_diff_id,
)
from snapshotter.service.layout import Layout
from snapshotter.service.mounts import CLASSIC, MOUNT_STYLES, Mount, plan
from snapshotter.service.store import Info, Kind, Snapshot, Store, Usage
from snapshotter.verity import KATA_VERITY, VerityParams

if TYPE_CHECKING:
    from snapshotter.service.workers import WorkerPool

log = logging.getLogger(__name__)

Labels = dict[str, str] | None
DirConverter = Callable[[Path, Path], layer_build.LayerMeta]


class Snapshotter:
    def __init__(
        self,
        root: Path,
        convert: DirConverter | None = None,
        vm_mode: bool = False,
        signing_key: Path | None = None,
        kata_verity: bool = False,
        limits: Limits = DEFAULT_LIMITS,
        mount_style: str = CLASSIC,
        layer_caches: Sequence[Path] = (),
        workers: WorkerPool | None = None,
        tail_packing: bool = False,
    ) -> None:
        if mount_style not in MOUNT_STYLES:
            raise InvalidArgument(
                f"mount style {mount_style!r} is not one of {', '.join(MOUNT_STYLES)}"
            )
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.root = root
        self.store = Store(root / "metadata.db")
        self.layout = Layout(root, kind_of=self.store.kind_of)
        # Layer trees: containerd's salted geometry, or unsalted for Kata's readers (which
        # carry no salt; docs/kata.md). Commit's converter and the differ both use it.
        self.layer_verity: bool | VerityParams = KATA_VERITY if kata_verity else True
        self.limits = limits  # the differ's ceilings on one tar layer (docs/erofs.md)
        self.tail_packing = tail_packing  # of the layers the differ and Commit convert
        # Commit's conversion of fs/: in a worker process when serve gave a pool (workers.py)
        self._convert = convert or functools.partial(
            workers.convert_directory if workers else layer_build.convert_directory,
            verity=self.layer_verity,
            tail_packing=tail_packing,
        )
        self.mount_style = mount_style  # non-VM-mode snapshots' mounts (mounts.py)
        self.layer_cache = LayerCache(layer_caches)  # the differ's pre-built layers
        self.vm_mode = vm_mode  # default for container rootfs snapshots without the label
        self.signing_key = signing_key  # signs VM-mode chains' root-hash manifests
        # Held while a chain image is built or a VM-mode snapshot is created, and by Cleanup's
        # chain pass: an image being built, or built for a snapshot not yet in the metadata,
        # is never taken for unused.
        self._chains_lock = threading.RLock()

    def close(self) -> None:
        self.store.close()

    # -- create --------------------------------------------------------------------------------

    def prepare(self, key: str, parent: str = "", labels: Labels = None) -> list[Mount]:
        labels = labels or {}
        self._commit_from_cache(key, parent, labels)  # AlreadyExists on a hit
        return self._create(Kind.ACTIVE, key, parent, labels)

    def _commit_from_cache(self, key: str, parent: str, labels: dict[str, str]) -> None:
        """On a layer-cache hit for the unpack Prepare KEY, commit its layer now and raise
        AlreadyExists, as remote snapshotters (stargz, nydus) do.

        containerd's unpacker (1.7 pkg/unpack, 2.x core/unpack) labels an extraction
        `containerd.io/snapshot.ref=<chain ID>`; on AlreadyExists its metadata layer looks for
        a committed backend snapshot with that label over the same parent, and the unpacker
        then neither fetches the layer (its fetch starts at the first layer whose Prepare
        succeeds) nor applies it. The snapshot is committed under the chain ID, like the
        active snapshot KEY that Commit would turn into it: created, filled from the cache
        entry (checked as the differ checks it, `LayerCache.stage`) under the snapshot's
        lock by `publish_layer`, then committed in one transaction. A refused entry is logged
        and the Prepare goes on as a miss, so containerd fetches and our differ converts."""
        target = labels.get(CHAIN_ID_LABEL, "")
        if not self.layer_cache or parse_diff_id(target) is None:
            return
        if self._already_committed(target, parent):
            return
        diff_id = self.layer_cache.diff_id_of(key, labels, parent)
        blob = self.layer_cache.find(diff_id) if diff_id else None
        if diff_id is None or blob is None:
            return
        self._create_snapshot(Kind.ACTIVE, key, parent, labels, vm=False)
        try:
            sid = self.store.get_info(key)[0]
            with self.layout.busy(sid):
                meta = layer_build.publish_layer(
                    self.layout.dir(sid),
                    lambda out: self.layer_cache.stage(
                        blob, out, diff_id, self.layer_verity, self.limits.max_image_bytes
                    ),
                )
            self.commit(target, key, labels)
        except CacheEntryError as exc:
            self._remove_quietly(key)
            log.warning(
                "layer cache entry refused at prepare, the layer will be fetched",
                extra={"key": key, "diff_id": diff_id, "reason": str(exc)},
            )
            return
        except AlreadyExists:  # another namespace's pull committed it meanwhile
            self._remove_quietly(key)
            if not self._already_committed(target, parent):
                raise
        except BaseException:
            self._remove_quietly(key)
            raise
        else:
            log.info(
                "layer from cache at prepare",
                extra={
                    "key": key,
                    "committed": target,
                    "diff_id": diff_id,
                    "blob": str(blob),
                    "root_hash": meta.root_hash,
                    "cache_hits": self.layer_cache.hits,
                },
            )
        raise AlreadyExists(f"target snapshot {target!r} committed from the layer cache")

    def _already_committed(self, name: str, parent: str) -> bool:
        """True when committed snapshot NAME exists over PARENT: raises AlreadyExists then,
        which containerd takes as the layer being unpacked. False when there is none, or one
        over another parent (containerd would not accept it: a normal Prepare follows)."""
        try:
            info = self.store.get_info(name)[1]
        except NotFound:
            return False
        if (
            info.kind == Kind.COMMITTED
            and info.parent == parent
            and info.labels.get(CHAIN_ID_LABEL) == name
        ):
            raise AlreadyExists(f"target snapshot {name!r} already exists")
        return False

    def _remove_quietly(self, key: str) -> None:
        with contextlib.suppress(NotFound):
            self.remove(key)

    def view(self, key: str, parent: str = "", labels: Labels = None) -> list[Mount]:
        return self._create(Kind.VIEW, key, parent, labels or {})

    def _create(self, kind: Kind, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        vm = bool(parent) and vm_mode.wants_vm_mode(key, labels, self.vm_mode)
        # A VM-mode snapshot's chain image must not look unused to Cleanup before its row is in.
        with self._chains_lock if vm else contextlib.nullcontext():
            return self._create_snapshot(kind, key, parent, labels, vm)

    def _create_snapshot(
        self, kind: Kind, key: str, parent: str, labels: dict[str, str], vm: bool
    ) -> list[Mount]:
        if vm:
            # Built before the transaction, published immutably: the snapshot's mounts name
            # files that exist and never change.
            labels = {**labels, vm_mode.VM_MODE_LABEL: "true"}
            self._chain_image(self.store.committed_chain(parent))
        staged = self.layout.stage(kind)
        try:
            with self.store.transaction() as db:
                snap = self.store.create(db, kind, key, parent, labels)
                self._own_like_parent(staged, snap)
                self.layout.claim(staged, snap.id)
        finally:
            if staged.exists():
                self.layout.unstage(staged)
        log.info(
            "created", extra={"key": key, "id": snap.id, "kind": kind.name.lower(), "vm_mode": vm}
        )
        if vm:
            return self._vm_mounts(snap)
        return plan(snap, self.layout, self.mount_style)

    def _vm_mounts(self, snap: Snapshot) -> list[Mount]:
        """The VM-mode mount; an active snapshot's names its upper/work (runc's overlay)."""
        image = self._chain_image(snap.parent_ids)
        if snap.kind == Kind.ACTIVE:
            return vm_mode.vm_mounts(image, self.layout.fs(snap.id), self.layout.work(snap.id))
        return vm_mode.vm_mounts(image)

    def _chain_image(self, parent_ids: list[str]) -> vm_mode.ChainImage:
        with self._chains_lock:
            return vm_mode.ensure_chain_image(self.root, self.layout, parent_ids, self.signing_key)

    def _own_like_parent(self, staged: Path, snap: Snapshot) -> None:
        """The new upper's root gets the owner of the image's root (what overlay shows)."""
        if snap.kind == Kind.ACTIVE and snap.parent_ids:
            st = os.stat(self.layout.mount_layer(snap.parent_ids[0]))
            os.lchown(staged / "fs", st.st_uid, st.st_gid)

    # -- read ----------------------------------------------------------------------------------

    def mounts(self, key: str) -> list[Mount]:
        snap = self.store.get_snapshot(key)
        if snap.parent_ids and self.stat(key).labels.get(vm_mode.VM_MODE_LABEL) == "true":
            return self._vm_mounts(snap)
        return plan(snap, self.layout, self.mount_style)

    def stat(self, key: str) -> Info:
        return self.store.get_info(key)[1]

    def usage(self, key: str) -> Usage:
        sid, info, usage = self.store.get_info(key)
        if info.kind == Kind.ACTIVE:
            return Usage(*disk_usage(self.layout.fs(sid)))
        return usage

    def walk(self, filters: list[str] | None = None) -> list[Info]:
        match = compile_filters(filters or [])
        return [info for info in self.store.walk() if match(_getter(info))]

    def update(self, key: str, labels: dict[str, str], paths: list[str]) -> Info:
        return self.store.update_info(key, labels, paths)

    # -- commit / remove -----------------------------------------------------------------------

    def commit(self, name: str, key: str, labels: Labels = None, parent: str = "") -> None:
        if not name:
            raise InvalidArgument("committed snapshot name must not be empty")
        sid, info, _ = self.store.get_info(key)
        if info.kind != Kind.ACTIVE:
            raise FailedPrecondition(f"snapshot {key!r} is not active")
        if self._exists(name):
            raise AlreadyExists(f"committed snapshot {name!r} already exists")
        with self.layout.busy(sid):
            # Another Commit (or a Remove) of KEY may have finished while we waited.
            if self.store.get_info(key)[0] != sid:
                raise NotFound(f"snapshot {key!r} was removed during commit")
            meta = self._layer_of(sid)
            usage = Usage(self.layout.layer(sid).stat().st_size, 1)
            with self.store.transaction() as db:
                self.store.commit_active(
                    db, key, name, usage, {**(labels or {}), **meta.labels()}, parent
                )
            log.info(
                "committed",
                extra={
                    "key": key,
                    "committed": name,
                    "id": sid,
                    "root_hash": meta.root_hash,
                    "size": meta.blob_size,
                },
            )
            self.layout.retire_upper(sid)

    def _exists(self, key: str) -> bool:
        try:
            self.store.get_info(key)
        except NotFound:
            return False
        return True

    def _layer_of(self, sid: str) -> layer_build.LayerMeta:
        """The layer our differ (or an interrupted Commit) left, or a fresh one from fs/."""
        directory = self.layout.dir(sid)
        meta = layer_build.read_layer(directory)
        if meta is not None:
            return meta
        fs = self.layout.fs(sid)
        return layer_build.publish_layer(directory, lambda out: self._convert(fs, out))

    def remove(self, key: str) -> None:
        sid = self.store.get_info(key)[0]
        with self.layout.hold(sid):  # after a Commit or Apply writing SID has finished
            with self.store.transaction() as db:
                removed, kind = self.store.remove(db, key)
                if removed != sid:  # KEY was removed and made again while we waited
                    raise NotFound(f"snapshot {key!r} was removed meanwhile")
            log.info("removed", extra={"key": key, "id": sid, "kind": kind.name.lower()})
            try:
                self.layout.discard(self.layout.dir(sid))
            except OSError as exc:  # busy: Cleanup retries
                log.warning("removal deferred to cleanup", extra={"id": sid, "error": str(exc)})

    def cleanup(self) -> list[Path]:
        """Remove what no snapshot owns: orphan directories and interrupted calls' leftovers."""
        removed: list[Path] = []
        # One transaction for reading the ids and removing orphans: creation claims its
        # directory inside its own transaction, so none can appear between the two.
        with self.store.transaction() as db:
            ids = self.store.id_map(db)
            for path in self.layout.orphans(set(ids)):
                self.layout.discard(path)
                removed.append(path)
        for sid, (_, kind) in ids.items():
            removed += self.layout.leftovers(sid, kind)
        with self._chains_lock:
            removed += vm_mode.cleanup_chain_images(self.root, self._chains_in_use())
        if removed:
            log.info("cleanup", extra={"removed": [str(p) for p in removed]})
        return removed

    def _chains_in_use(self) -> set[str]:
        in_use = set()
        for chain in self.store.chains_labelled(vm_mode.VM_MODE_LABEL, "true"):
            read = [layer_build.read_layer(self.layout.dir(sid)) for sid in chain]
            metas = [meta for meta in read if meta is not None]
            if chain and len(metas) == len(read):
                in_use.add(vm_mode.chain_key(list(reversed(metas))))
        return in_use


def _getter(info: Info) -> Callable[[list[str]], str | None]:
    def get(path: list[str]) -> str | None:
        head, rest = path[0], ".".join(path[1:])
        if head == "labels":
            return info.labels.get(rest)
        return {"name": info.name, "parent": info.parent, "kind": info.kind.name.lower()}.get(head)

    return get
