"""VM-mode rootfs: one fsmeta per parent chain, and the mounts a VM runtime attaches.

A container rootfs for a VM (not an unpack) gets, instead of an overlay of host layer mounts,
one mount of the chain's fsmeta that names, by reference, the chain's description (fsmeta.json:
every device in device order with its dm-verity data). A VM runtime reads the description and
hands every device to the guest behind dm-verity; runc gets the same mount working too: its type
is `fuse.erofs-passthrough-mount`, which containerd (1.6 on) and mount(8) give to the
`mount.fuse` helper, which runs our mount program (snapshotter/service/mount_helper.py): it mounts
the fsmeta with its devices and the snapshot's overlay on top. The options stay a few hundred bytes
for any number of layers (the kernel takes one page; 500 `device=` paths alone are ~47 KB).

The fsmeta of a chain is built once, before the metadata transaction that creates the
snapshot, under `<root>/fsmeta/<key>/` where the key is the sha256 of the chain's blob digests
(lowest first). A published directory is never changed afterwards, so the mounts of an
existing snapshot never change either (upstream's fsmeta hit ESTALE when they did).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from snapshotter.errors import EpError
from snapshotter.fsmeta.merge import LayerBlob, merge_layers
from snapshotter.fsutil import fsync_dir, remove_tree, write_atomic
from snapshotter.service import layer_build
from snapshotter.service.layout import Layout
from snapshotter.service.mounts import Mount
from snapshotter.verity import KATA_VERITY, VerityParams

VM_MODE_LABEL = "containerd.io/snapshot/erofs.vm-mode"
MOUNT_PROGRAM = "erofs-passthrough-mount"
MOUNT_TYPE = "fuse." + MOUNT_PROGRAM
# No `X-`/`x-` prefix: mount(8) does not pass those on to mount helpers (measured).
DESCRIPTION_OPTION = "erofs-passthrough.description="
FSMETA = "image.fsmeta"
DESCRIPTION = "fsmeta.json"
MAX_DESCRIPTION_BYTES = 64 << 20  # ~1 KB a layer: far beyond any real chain, bounded memory


class VmMountError(EpError):
    """A VM-mode mount or its description is not what the snapshotter hands out."""


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
        result = merge_layers(blobs, staged / FSMETA,
                              verity=fsmeta_verity([m.salt for m in metas]))
        description = _describe(result, metas, final)
        if signing_key is not None:
            description["manifest"] = _write_signed_manifest(staged, final, description,
                                                             signing_key)
        # Durable before the directory is published: VM-mode mounts name this file, and the
        # mount program and the shim read their devices from it.
        write_atomic(staged / DESCRIPTION,
                     json.dumps(description, indent=2, sort_keys=True).encode())
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
    from snapshotter.manifest import build_manifest, load_private_key, sign, verity_entry

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
    write_atomic(staged / "manifest.json", payload)
    write_atomic(staged / "manifest.sig", json.dumps(signature).encode())
    return {"path": str(final / "manifest.json"), "signature": str(final / "manifest.sig"),
            "key_id": signature["key_id"]}


def vm_mounts(image: ChainImage, upper: Path | None = None,
              work: Path | None = None) -> list[Mount]:
    """The one mount of a VM-mode snapshot: the fsmeta, its description by path, and for an
    active snapshot its upper and work directories (for runc's overlay; a VM runtime keeps
    its writable layer in the guest). Nothing in it grows with the number of layers."""
    options = ["ro"] if upper is None else [f"upperdir={upper}", f"workdir={work}"]
    options.append(DESCRIPTION_OPTION + str(image.directory / DESCRIPTION))
    return [Mount(MOUNT_TYPE, str(image.fsmeta), options)]


def description_option(options: Sequence[str]) -> str:
    """The description path a VM-mode mount's options carry (exactly one)."""
    found = [o[len(DESCRIPTION_OPTION):] for o in options if o.startswith(DESCRIPTION_OPTION)]
    if len(found) != 1:
        raise VmMountError(f"the mount carries {len(found)} {DESCRIPTION_OPTION.rstrip('=')} "
                           "options, not one (is the snapshot in VM mode?)")
    return found[0]


def load_chain_image(fsmeta: str | Path, description: str | Path) -> ChainImage:
    """The chain image a VM-mode mount names, read from its description file.

    Only `fsmeta.json` in the fsmeta's own chain directory is read (no symlinks, no other
    place: a mount is not a way to make us read or attach arbitrary files), of bounded size,
    and it must describe that very fsmeta."""
    fsmeta, description = Path(fsmeta), Path(description)
    if not fsmeta.is_absolute() or fsmeta.name != FSMETA:
        raise VmMountError(f"{fsmeta}: not an absolute path to a chain's {FSMETA}")
    if description != fsmeta.parent / DESCRIPTION:
        raise VmMountError(f"description {description} is not {DESCRIPTION} in the chain "
                           f"directory of {fsmeta}")
    if os.path.realpath(description) != os.path.join(os.path.realpath(fsmeta.parent),
                                                     DESCRIPTION):
        raise VmMountError(f"description {description} leads outside {fsmeta.parent}")
    try:
        fd = os.open(description, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise VmMountError(f"description {description}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_DESCRIPTION_BYTES:
            raise VmMountError(f"description {description}: not a regular file of at most "
                               f"{MAX_DESCRIPTION_BYTES} bytes")
        raw = f.read(MAX_DESCRIPTION_BYTES + 1)
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise VmMountError(f"description {description}: not JSON ({exc})") from None
    image = ChainImage(fsmeta.parent, data)
    try:
        devices = image.devices()
        if not all(isinstance(d, dict) and isinstance(d["path"], str)
                   and isinstance(d["root_hash"], str) for d in devices):
            raise TypeError("a device is not an object with a path and a root_hash")
    except (KeyError, TypeError) as exc:
        raise VmMountError(f"description {description}: malformed ({exc})") from None
    if devices[0]["path"] != str(fsmeta) or devices[0].get("role") != "fsmeta":
        raise VmMountError(f"description {description} describes {devices[0]['path']}, "
                           f"not {fsmeta}")
    return image


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
