"""VM-mode rootfs: one fsmeta per parent chain, and the mounts a VM runtime attaches.

A container rootfs for a VM (not an unpack) gets, instead of an overlay of host layer mounts,
one mount of the chain's fsmeta that names, by reference, the chain's description (fsmeta.json:
every device in device order with its dm-verity data). A VM runtime reads the description and
hands every device to the guest behind dm-verity; runc gets the same mount working too: its type
is `fuse.erofs-passthrough-mount`, which containerd (1.6 on) and mount(8) give to the
`mount.fuse` helper, which runs our mount program (snapshotter/service/mount_helper.py): it mounts
the fsmeta with its devices and the snapshot's overlay on top. The options stay a few hundred bytes
for any number of layers (the kernel takes one page; 500 `device=` paths alone are ~47 KB). The
description, the mount type and the option naming it are defined in `snapshotter.fsmeta.devices`.

The fsmeta of a chain is built once, before the metadata transaction that creates the
snapshot, under `<root>/fsmeta/<key>/` where the key is the sha256 of the chain's blob digests
(lowest first); when a shorter chain it extends is published, it continues from that chain's
fsmeta (incremental: only the new layers are read). A published directory is never changed
afterwards, so the mounts of an existing snapshot never change either (upstream's fsmeta hit
ESTALE when they did).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from snapshotter.fsmeta.devices import (
    DESCRIPTION,
    FSMETA,
    MOUNT_TYPE,
    ChainDescription,
    LayerImage,
    describe_merge,
    encode_description_option,
)
from snapshotter.fsmeta.merge import LayerBlob, merge_layers
from snapshotter.fsutil import fsync_dir, remove_tree, write_atomic
from snapshotter.service import layer_build
from snapshotter.service.layout import Layout
from snapshotter.service.mounts import Mount
from snapshotter.verity import KATA_VERITY, VerityParams

VM_MODE_LABEL = "containerd.io/snapshot/erofs.vm-mode"


@dataclass(frozen=True)
class ChainImage:
    """A published fsmeta and the devices it addresses, as the guest must see them."""

    directory: Path
    description: ChainDescription

    @property
    def fsmeta(self) -> Path:
        return self.directory / FSMETA


def wants_vm_mode(key: str, labels: dict[str, str], default: bool) -> bool:
    """Label first; else the configured default, never for an unpack (`.../extract-...`)."""
    if VM_MODE_LABEL in labels:
        return labels[VM_MODE_LABEL] == "true"
    return default and "/extract-" not in key


# Bumped whenever what a chain directory holds changes for the same layers (2: the device table
# addresses whole files, the description travels by reference): an older service's chain
# directories are then never reused, and Cleanup removes them once no snapshot uses them.
CHAIN_LAYOUT = 2


def chain_key_of(blob_digests: list[str]) -> str:
    """A chain directory's name: its layers' EROFS blob digests, lowest first, and the layout
    version. `publish` names the same chain the same way."""
    layers = ",".join(blob_digests)
    return hashlib.sha256(f"chain v{CHAIN_LAYOUT}:{layers}".encode()).hexdigest()


def chain_key(metas: list[layer_build.LayerMeta]) -> str:
    return chain_key_of([m.blob_digest for m in metas])


def fsmeta_verity(layer_salts: list[str]) -> bool | VerityParams:
    """The fsmeta's tree follows its layers': unsalted (for Kata's readers, which carry no
    salt) when every layer's is, so one chain always gets the same fsmeta and root."""
    return KATA_VERITY if all(not salt for salt in layer_salts) else True


def ensure_chain_image(
    root: Path, layout: Layout, parent_ids: list[str], signing_key: Path | None = None
) -> ChainImage:
    """The fsmeta of the chain (parent_ids nearest first), building and publishing it once.
    With a signing key, a signed root-hash manifest is published beside it."""
    lowest_first = list(reversed(parent_ids))
    metas = []
    for sid in lowest_first:
        meta = layer_build.read_layer(layout.dir(sid))
        if meta is None:
            raise FileNotFoundError(f"snapshot {sid} has no layer image")
        metas.append(meta)
    base = root / "fsmeta"
    base.mkdir(mode=0o700, exist_ok=True)
    final = base / chain_key(metas)
    if (final / DESCRIPTION).is_file():
        return _published(final)
    staged = Path(tempfile.mkdtemp(prefix="new-", dir=base))
    try:
        blobs: list[LayerBlob | str | os.PathLike[str]] = [
            LayerBlob(layout.layer(sid), tag=m.blob_digest.removeprefix("sha256:"))
            for sid, m in zip(lowest_first, metas, strict=True)
        ]
        result = merge_layers(
            blobs,
            staged / FSMETA,
            verity=fsmeta_verity([m.salt for m in metas]),
            parent=_published_prefix(base, metas),
        )
        description = describe_merge(
            result,
            final / FSMETA,
            [LayerImage(m.blob_size, m.blob_digest, m.diff_id, m.verity()) for m in metas],
        )
        if signing_key is not None:
            description = replace(
                description,
                manifest=_write_signed_manifest(staged, final, description, signing_key),
            )
        # Durable before the directory is published: VM-mode mounts name this file, and the
        # mount program and the shim read their devices from it.
        write_atomic(staged / DESCRIPTION, description.to_bytes())
        fsync_dir(staged)
        try:
            os.rename(staged, final)
        except OSError:
            if not (final / DESCRIPTION).is_file():
                raise
            # Another call published the same chain first: same content, keep theirs.
        fsync_dir(base)
    finally:
        if staged.exists():
            remove_tree(staged)
    return _published(final)


def _published_prefix(base: Path, metas: list[layer_build.LayerMeta]) -> Path | None:
    """The fsmeta of the longest published chain the new one extends (its first layers), to
    continue from: the merge then reads that one fsmeta and applies only the layers above
    it, for the same bytes as merging every layer (merge_layers checks it can, else merges
    from scratch). A parent chain's fsmeta exists whenever a container ran on the parent
    image, or on the layers below a new one while they were being built upon."""
    for count in range(len(metas) - 1, 0, -1):
        candidate = base / chain_key(metas[:count])
        if (candidate / DESCRIPTION).is_file():
            return candidate / FSMETA
    return None


def _published(final: Path) -> ChainImage:
    """A published chain directory, read back through the description's one parser."""
    return ChainImage(final, ChainDescription.from_bytes((final / DESCRIPTION).read_bytes()))


def _write_signed_manifest(
    staged: Path, final: Path, description: ChainDescription, signing_key: Path
) -> dict[str, str]:
    """manifest.json + manifest.sig: every device's root hash, in device order."""
    from snapshotter.manifest import build_manifest, load_private_key, sign, verity_entry

    fsmeta = description.fsmeta
    layers = description.layers
    manifest = build_manifest(
        image={"chain": final.name},
        layers=[
            {
                "diff_id": d.diff_id,
                "erofs_digest": d.digest,
                "verity": verity_entry(d.verity),
            }
            for d in layers
        ],
        fsmeta={
            "digest": fsmeta.digest or "",
            "tags": [d.tag for d in layers],
            "verity": verity_entry(fsmeta.verity),
        },
    )
    payload, signature = sign(manifest, load_private_key(signing_key))
    write_atomic(staged / "manifest.json", payload)
    write_atomic(staged / "manifest.sig", json.dumps(signature).encode())
    return {
        "path": str(final / "manifest.json"),
        "signature": str(final / "manifest.sig"),
        "key_id": signature["key_id"],
    }


def vm_mounts(
    image: ChainImage, upper: Path | None = None, work: Path | None = None
) -> list[Mount]:
    """The one mount of a VM-mode snapshot: the fsmeta, its description by path, and for an
    active snapshot its upper and work directories (for runc's overlay; a VM runtime keeps
    its writable layer in the guest). Nothing in it grows with the number of layers."""
    options = ["ro"] if upper is None else [f"upperdir={upper}", f"workdir={work}"]
    options.append(encode_description_option(image.directory / DESCRIPTION))
    return [Mount(MOUNT_TYPE, str(image.fsmeta), options)]


def cleanup_chain_images(root: Path, in_use: set[str]) -> list[Path]:
    """Remove fsmeta directories no VM-mode snapshot uses (and interrupted builds)."""
    base = root / "fsmeta"
    removed: list[Path] = []
    if not base.is_dir():
        return removed
    for entry in base.iterdir():
        if entry.name not in in_use:
            remove_tree(entry)
            removed.append(entry)
    return removed
