"""VM-mode rootfs: one fsmeta per parent chain, and the mounts a VM runtime attaches.

A container rootfs for a VM (not an unpack) gets, instead of an overlay of host loop mounts,
one `erofs` mount of the chain's fsmeta with one `device=` per layer blob, plus what the
runtime needs to hand every device to the guest behind dm-verity.

The fsmeta of a chain is built once, before the metadata transaction that creates the
snapshot, under `<root>/fsmeta/<key>/` where the key is the sha256 of the chain's blob digests
(lowest first). A published directory is never changed afterwards, so the mounts of an
existing snapshot never change either (upstream's fsmeta hit ESTALE when they did).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from snapshotter import layer_build
from snapshotter.erofs.merge import LayerBlob, merge_layers
from snapshotter.fsutil import fsync_dir, remove_tree
from snapshotter.layout import Layout
from snapshotter.mounts import Mount
from snapshotter.verity import KATA_VERITY

VM_MODE_LABEL = "containerd.io/snapshot/erofs.vm-mode"
DEVICES_OPTION = "X-erofs-passthrough.devices="
FSMETA = "image.fsmeta"
DESCRIPTION = "fsmeta.json"


@dataclass(frozen=True)
class ChainImage:
    """A published fsmeta and the devices it addresses, as the guest must see them."""

    directory: Path
    description: dict

    @property
    def fsmeta(self) -> Path:
        return self.directory / FSMETA

    def devices(self) -> list[dict]:
        """Every device the guest gets, the fsmeta first, each with its dm-verity data."""
        return [self.description["fsmeta"], *self.description["layers"]]


def wants_vm_mode(key: str, labels: dict[str, str], default: bool) -> bool:
    """Label first; else the configured default, never for an unpack (`.../extract-...`)."""
    if VM_MODE_LABEL in labels:
        return labels[VM_MODE_LABEL] == "true"
    return default and "/extract-" not in key


def chain_key(metas: list[layer_build.LayerMeta]) -> str:
    return hashlib.sha256(",".join(m.blob_digest for m in metas).encode()).hexdigest()


def ensure_chain_image(root: Path, layout: Layout, parent_ids: list[str],
                       signing_key: Path | None = None) -> ChainImage:
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
        return ChainImage(final, json.loads((final / DESCRIPTION).read_text()))
    staged = Path(tempfile.mkdtemp(prefix="new-", dir=base))
    try:
        blobs = [LayerBlob(layout.layer(sid), tag=m.blob_digest.removeprefix("sha256:"))
                 for sid, m in zip(lowest_first, metas, strict=True)]
        # The fsmeta's tree follows its layers': unsalted (for Kata's readers, which carry no
        # salt) when every layer's is, so one chain always gets the same fsmeta and root.
        verity = KATA_VERITY if all(not m.salt for m in metas) else True
        result = merge_layers(blobs, staged / FSMETA, verity=verity)
        description = _describe(result, metas, final)
        if signing_key is not None:
            description["manifest"] = _write_signed_manifest(staged, final, description,
                                                             signing_key)
        (staged / DESCRIPTION).write_text(json.dumps(description, indent=2, sort_keys=True))
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
    return ChainImage(final, json.loads((final / DESCRIPTION).read_text()))


def _describe(result, metas: list[layer_build.LayerMeta], final: Path) -> dict:
    v = result.verity
    return {
        "fsmeta": {
            "path": str(final / FSMETA), "size": result.size, "role": "fsmeta",
            "digest": result.digest, "root_hash": v.root_hash, "verity": v.to_json(),
        },
        "layers": [
            {
                "path": str(dev.path), "size": meta.blob_size, "role": "layer", "device": i,
                "tag": dev.tag, "blocks": dev.blocks, "uniaddr": dev.uniaddr,
                "digest": meta.blob_digest,
                "diff_id": meta.diff_id, "root_hash": meta.root_hash,
                "verity": meta.verity().to_json(),
            }
            for i, (dev, meta) in enumerate(zip(result.devices, metas, strict=True), start=1)
        ],
    }


def _write_signed_manifest(staged: Path, final: Path, description: dict,
                           signing_key: Path) -> dict:
    """manifest.json + manifest.sig: every device's root hash, in device order."""
    from shim_integration.manifest import build_manifest, load_private_key, sign, verity_entry

    fsmeta = description["fsmeta"]
    layers = description["layers"]
    manifest = build_manifest(
        image={"chain": final.name},
        layers=[{"diff_id": d["diff_id"], "erofs_digest": d["digest"],
                 "verity": verity_entry(d["verity"])} for d in layers],
        fsmeta={"digest": fsmeta.get("digest", ""), "tags": [d["tag"] for d in layers],
                "verity": verity_entry(fsmeta["verity"])},
    )
    payload, signature = sign(manifest, load_private_key(signing_key))
    (staged / "manifest.json").write_bytes(payload)
    (staged / "manifest.sig").write_text(json.dumps(signature))
    return {"path": str(final / "manifest.json"), "signature": str(final / "manifest.sig"),
            "key_id": signature["key_id"]}


def vm_mounts(image: ChainImage) -> list[Mount]:
    """One erofs mount of the fsmeta, one `device=` per blob (in device-table order), and
    an option carrying every device's dm-verity data for the runtime (mount(8) ignores
    `X-` options; a VM runtime reads it and attaches the devices instead of mounting)."""
    devices = image.devices()
    payload = base64.b64encode(json.dumps(devices, sort_keys=True).encode()).decode()
    options = ["ro", *(f"device={d['path']}" for d in devices[1:]), DEVICES_OPTION + payload]
    return [Mount("erofs", str(image.fsmeta), options)]


def cleanup_chain_images(root: Path, in_use: set[str]) -> list[Path]:
    """Remove fsmeta directories no VM-mode snapshot uses (and interrupted builds)."""
    base = root / "fsmeta"
    removed = []
    if not base.is_dir():
        return removed
    for entry in base.iterdir():
        if entry.name not in in_use:
            remove_tree(entry)
            removed.append(entry)
    return removed
