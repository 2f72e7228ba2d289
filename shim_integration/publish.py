"""Publish signed root manifests beside an image in its registry; fetch and verify them.

`publish` runs where the publisher's key lives (a build pipeline): it pulls the image, converts
every layer and merges the chain exactly as a node's snapshotter does (same functions, same
verity choices), signs the root manifest (`manifest.build_manifest`, the shape `serve` writes,
bound to the image manifest's digest and platform) and pushes it as an OCI 1.1 artifact whose
`subject` is the image manifest. Nodes then fetch it (`fetch_manifest`, no key needed) and
check it against their own conversion (`verify_directory`) before a guest is booted; the guest
checks the signature again with the key it booted with. Layout: docs/publish.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shim_integration.registry import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    Reference,
    RegistryClient,
    artifact_tag,
    check_digest,
    sha256_digest,
)
from snapshotter.errors import EpError
from snapshotter.fsmeta.devices import (
    ChainDescription,
    DeviceListError,
    LayerImage,
    describe_merge,
    device_list_roots,
)
from snapshotter.fsutil import check_input, check_output, open_input, write_atomic
from snapshotter.ingest.rules import CONVERSION_RULES
from snapshotter.verity import KATA_VERITY, VerityInfo

ARTIFACT_TYPE = "application/vnd.erofs-passthrough.root-manifest.v1"
MANIFEST_MEDIA_TYPE = "application/vnd.erofs-passthrough.root-manifest.v1+json"
SIGNATURE_MEDIA_TYPE = "application/vnd.erofs-passthrough.root-manifest.signature.v1+json"
EROFS_LAYER = "application/vnd.erofs.layer.v1"
# What `--layers` pushes by default: the same native layer under the OCI layer prefix, the only
# form containerd 1.7 to 2.2 unpack at all and the one containerd 2.1/2.2's own erofs differ
# takes; `--layer-media-type` picks EROFS_LAYER for containerd 2.3+'s (the upstream functions:
# docs/publish.md, "Media type").
OCI_EROFS_LAYER = "application/vnd.oci.image.layer.v1.erofs"
LAYER_MEDIA_TYPES = (OCI_EROFS_LAYER, EROFS_LAYER)
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
EMPTY_MEDIA_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY_JSON = b"{}"
CREATED = "org.opencontainers.image.created"
KEY_ID_ANNOTATION = "dev.erofs-passthrough.key-id"
RULES_ANNOTATION = "dev.erofs-passthrough.conversion"
#: A root manifest or its signature is a few KiB per layer; refuse anything absurd.
MAX_ROOT_MANIFEST_BYTES = 1 << 20
MAX_CONFIG_BYTES = 1 << 20
MAX_KEY_BYTES = 64 << 10
MAX_DEVICE_LIST_BYTES = 16 << 20


class PublishError(EpError):
    """A publish, fetch or verify that must not go on; the message says why."""


@dataclass
class Image:
    """An image manifest resolved in a registry, with its config."""

    client: RegistryClient
    digest: str
    manifest_bytes: bytes
    manifest: dict[str, Any]
    config: dict[str, Any]
    platform: dict[str, str] = field(default_factory=dict)

    @property
    def descriptor(self) -> dict[str, Any]:
        return {
            "mediaType": self.manifest.get("mediaType", OCI_MANIFEST),
            "digest": self.digest,
            "size": len(self.manifest_bytes),
        }


def resolve_image(ref: Reference, plain_http: bool, platform: str = "linux/amd64") -> Image:
    """The image manifest REF names (for an index: the PLATFORM entry) and its config."""
    client = RegistryClient(ref, plain_http)
    data, media_type, digest = client.get_manifest(ref.target)
    manifest = _json_object(data, f"manifest {digest}")
    if media_type in (OCI_INDEX, DOCKER_LIST):
        os_name, _, arch = platform.partition("/")
        for entry in _list(manifest.get("manifests")):
            p = _dict(_dict(entry).get("platform"))
            if p.get("os") == os_name and p.get("architecture") == arch:
                data, media_type, digest = client.get_manifest(check_digest(entry.get("digest")))
                manifest = _json_object(data, f"manifest {digest}")
                break
        else:
            raise PublishError(f"{ref}: the index has no {platform} image")
    layers = manifest.get("layers")
    if (
        media_type not in (OCI_MANIFEST, DOCKER_MANIFEST)
        or not isinstance(layers, list)
        or not all(isinstance(d, dict) for d in layers)
        or not isinstance(manifest.get("config"), dict)
    ):
        raise PublishError(f"{ref}: {digest} is not an image manifest ({media_type})")
    config = _json_object(
        client.get_small_blob(check_digest(manifest["config"].get("digest")), MAX_CONFIG_BYTES),
        f"config of {digest}",
    )
    plat = {"os": str(config.get("os", "")), "architecture": str(config.get("architecture", ""))}
    if config.get("variant"):
        plat["variant"] = str(config["variant"])
    return Image(client, digest, data, manifest, config, plat)


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise PublishError(f"{what} is not JSON") from None
    if not isinstance(value, dict):
        raise PublishError(f"{what} is not a JSON object")
    return value


def read_input(path: Path, limit: int) -> bytes:
    """A small input file (a key, a manifest, a device list): a regular file (a FIFO cannot
    hang us) of at most LIMIT bytes (its size cannot cost memory)."""
    with open_input(path) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise PublishError(f"{path}: larger than {limit} bytes")
    return data


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _declared_size(desc: dict[str, Any], what: str) -> int:
    size = desc.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise PublishError(f"{what}: descriptor size {size!r} is not a byte count")
    return size


# -- conversion ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvertedLayer:
    path: Path  # the EROFS image with its tree appended, as a node stores layer.erofs
    digest: str  # the image layer's blob digest
    diff_id: str
    erofs_digest: str  # sha256 of the EROFS image bytes (before the tree)
    size: int
    verity: VerityInfo


def convert_image(image: Image, work: Path, kata_verity: bool = False) -> list[ConvertedLayer]:
    """Every layer of IMAGE, lowest first, converted as the node's differ converts it."""
    # what the node's differ takes
    from snapshotter.ingest.convert import convert_layer, import_erofs_image
    from snapshotter.service.diff_service import LAYER_MEDIA_TYPES, NATIVE_EROFS_LAYERS

    diff_ids = _list(_dict(image.config.get("rootfs")).get("diff_ids"))
    layers = image.manifest["layers"]
    if len(diff_ids) != len(layers) or not all(isinstance(d, str) for d in diff_ids):
        raise PublishError(
            f"image {image.digest}: {len(layers)} layers but {len(diff_ids)} diffIDs in its config"
        )
    verity = KATA_VERITY if kata_verity else True
    out = []
    for i, (desc, diff_id) in enumerate(zip(layers, diff_ids, strict=True), start=1):
        digest = check_digest(desc.get("digest"))
        media_type = desc.get("mediaType")
        blob = work / f"layer{i}.blob"
        image.client.get_blob(digest, blob, max_size=_declared_size(desc, f"layer {i}"))
        target = work / f"layer{i}.erofs"
        with open(blob, "rb") as f:
            if media_type in NATIVE_EROFS_LAYERS:
                if diff_id != digest:
                    raise PublishError(
                        f"layer {i}: a native EROFS layer's diffID is its "
                        f"digest {digest}, the config says {diff_id}"
                    )
                result = import_erofs_image(f, target, expected_digest=digest, verity=verity)
            elif media_type in LAYER_MEDIA_TYPES:
                result = convert_layer(
                    f, target, expected_diff_id=diff_id, verity=verity, blob_digest=True
                )
            else:
                raise PublishError(
                    f"layer {i}: media type {media_type} is neither a tar "
                    "layer nor a native EROFS layer"
                )
        blob.unlink()
        # both asked for above: verity=..., blob_digest=True (an import always has them)
        assert result.blob_digest is not None and result.verity is not None
        out.append(
            ConvertedLayer(
                target,
                digest,
                result.diff_id or digest,
                result.blob_digest,
                result.size,
                result.verity,
            )
        )
    return out


def chain_key(layers: list[ConvertedLayer]) -> str:
    """The name a node's snapshotter gives this chain's directory."""
    from snapshotter.service.vm_mode import chain_key_of

    return chain_key_of([c.erofs_digest for c in layers])


def merge_chain(layers: list[ConvertedLayer], out: Path) -> ChainDescription:
    """The chain's fsmeta, exactly as `snapshotter.service.vm_mode.ensure_chain_image` builds it,
    and its description (what a chain directory's fsmeta.json holds, with OUT's paths)."""
    from snapshotter.fsmeta.merge import LayerBlob, merge_layers
    from snapshotter.service.vm_mode import fsmeta_verity

    blobs: list[LayerBlob | str | os.PathLike[str]] = [
        LayerBlob(c.path, tag=c.erofs_digest.removeprefix("sha256:")) for c in layers
    ]
    result = merge_layers(blobs, out, verity=fsmeta_verity([c.verity.salt for c in layers]))
    return describe_merge(
        result, out, [LayerImage(c.size, c.erofs_digest, c.diff_id, c.verity) for c in layers]
    )


def root_manifest(
    image: Image, layers: list[ConvertedLayer], devices: ChainDescription
) -> dict[str, Any]:
    """The root manifest of `serve`'s shape, bound to the image manifest and platform."""
    from snapshotter.manifest import build_manifest, verity_entry

    return build_manifest(
        image={
            "repository": f"{image.client.ref.host}/{image.client.ref.repository}",
            "digest": image.digest,
            "platform": image.platform,
            "conversion": CONVERSION_RULES,
            "chain": chain_key(layers),
        },
        layers=[
            {
                "diff_id": c.diff_id,
                "digest": c.digest,
                "erofs_digest": c.erofs_digest,
                "verity": verity_entry(c.verity),
            }
            for c in layers
        ],
        fsmeta={
            "digest": devices.fsmeta.digest,
            "tags": [d.tag for d in devices.layers],
            "verity": verity_entry(devices.fsmeta.verity),
        },
    )


# -- publish -------------------------------------------------------------------------------


def publish(
    reference: str,
    key_path: Path,
    *,
    plain_http: bool = False,
    push_layers: bool = False,
    layers_tag: str | None = None,
    kata_verity: bool = False,
    platform: str = "linux/amd64",
    out_cache: Path | None = None,
    layer_media_type: str = OCI_EROFS_LAYER,
) -> dict[str, Any]:
    """Convert, merge, sign and push; returns every digest pushed (the `--json` object).
    OUT_CACHE: also put every converted layer into that layer cache directory
    (snapshotter.service.layer_cache, containerd's layer_content_caches layout).
    LAYER_MEDIA_TYPE: the media type of the `--layers` image's layers (LAYER_MEDIA_TYPES)."""
    from snapshotter.manifest import ManifestError, load_private_key

    if layer_media_type not in LAYER_MEDIA_TYPES:
        raise PublishError(
            f"layer media type {layer_media_type!r}: choose {' or '.join(LAYER_MEDIA_TYPES)}"
        )
    check_input(key_path)
    try:
        private_key = load_private_key(key_path)
    except ManifestError as exc:
        raise PublishError(str(exc)) from None
    ref = Reference.parse(reference)
    image = resolve_image(ref, plain_http, platform)
    with tempfile.TemporaryDirectory(prefix="ep-publish-") as tmp:
        work = Path(tmp)
        layers = convert_image(image, work, kata_verity)
        devices = merge_chain(layers, work / "image.fsmeta")
        # before anything is pushed: a cache that cannot be written fails the whole run
        cache = fill_cache(out_cache, layers) if out_cache is not None else None
        report: dict[str, Any] = {
            "image": str(ref),
            "image_digest": image.digest,
            "conversion": CONVERSION_RULES,
            "root_manifest": _push_root_manifest(
                image, root_manifest(image, layers, devices), private_key
            ),
        }
        report["devices"] = _roots(devices)
        if cache is not None:
            report["cache"] = cache
        if push_layers:
            report["erofs_image"] = _push_erofs_image(
                image, layers, devices, work, private_key, layers_tag, layer_media_type
            )
    return report


def fill_cache(directory: Path, layers: list[ConvertedLayer]) -> list[dict[str, str]]:
    """Each converted layer as DIRECTORY's entry for its diffID (blob + .dmverity sidecar,
    each atomically), exactly the bytes a node's differ stores, so a node's hit has the roots
    the signed manifest names."""
    from snapshotter.service.layer_cache import write_entry

    directory = directory.absolute()
    entries = []
    for c in layers:
        try:
            blob = write_entry(directory, c.diff_id, c.path, c.verity)
        except OSError as exc:
            where = exc.filename or directory
            raise PublishError(f"layer cache {where}: {exc.strerror}") from None
        entries.append({"diff_id": c.diff_id, "blob": str(blob), "root_hash": c.verity.root_hash})
    return entries


def _roots(devices: ChainDescription) -> dict[str, Any]:
    return {"fsmeta": devices.fsmeta.root_hash, "layers": [d.root_hash for d in devices.layers]}


def _push_root_manifest(image: Image, manifest: dict[str, Any], private_key: Any) -> dict[str, Any]:
    from snapshotter.manifest import sign

    payload, signature = sign(manifest, private_key)
    client = image.client
    empty = client.put_bytes(EMPTY_JSON)
    signed = client.put_bytes(payload)
    sig = client.put_bytes(json.dumps(signature, sort_keys=True).encode())
    annotations = {
        CREATED: datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        KEY_ID_ANNOTATION: signature["key_id"],
        RULES_ANNOTATION: CONVERSION_RULES,
    }
    artifact = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": EMPTY_MEDIA_TYPE, **empty},
        "layers": [
            {"mediaType": MANIFEST_MEDIA_TYPE, **signed},
            {"mediaType": SIGNATURE_MEDIA_TYPE, **sig},
        ],
        "subject": image.descriptor,
        "annotations": annotations,
    }
    data = json.dumps(artifact, sort_keys=True, separators=(",", ":")).encode()
    digest = sha256_digest(data)
    index = client.push_referrer(
        image.digest,
        data,
        OCI_MANIFEST,
        {
            "mediaType": OCI_MANIFEST,
            "digest": digest,
            "size": len(data),
            "artifactType": ARTIFACT_TYPE,
            "annotations": annotations,
        },
    )
    return {
        "artifact": digest,
        "manifest_blob": signed["digest"],
        "signature_blob": sig["digest"],
        "config_blob": empty["digest"],
        "referrers_index": index,
        "referrer_tag": artifact_tag(image.digest, digest) if index else None,
        "subject": image.digest,
        "key_id": signature["key_id"],
        "manifest_digest": "sha256:" + hashlib.sha256(payload).hexdigest(),
    }


def _push_erofs_image(
    image: Image,
    layers: list[ConvertedLayer],
    devices: ChainDescription,
    work: Path,
    private_key: Any,
    tag: str | None,
    media_type: str,
) -> dict[str, Any]:
    """The converted layers as an image of native EROFS layers (the image bytes without
    their trees: a node's differ adds its own), its config naming them as its diffIDs, and
    a signed root manifest for it. Its roots are the tar image's: a native import salts a
    layer from its image's UUID, which the tar conversion also used (snapshotter/ingest/
    rules.py), so the same bytes get the same tree and the same fsmeta (tags are the image
    digests). Only the binding differs: the manifest names this image, and each layer's
    digest and diffID is its EROFS image's (docs/publish.md)."""
    client = image.client
    ref = client.ref
    pushed = []
    for i, c in enumerate(layers, start=1):
        native = work / f"native{i}.erofs"
        with open(c.path, "rb") as src, open(native, "wb") as dst:
            _copy_prefix(src, dst, c.size)
        pushed.append({"mediaType": media_type, **client.put_blob(native, c.erofs_digest)})
        native.unlink()
    config = dict(image.config)
    config["rootfs"] = {"type": "layers", "diff_ids": [d["digest"] for d in pushed]}
    config.pop("history", None)  # the history describes the tar layers
    config_desc = {
        "mediaType": OCI_CONFIG,
        **client.put_bytes(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()),
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config_desc,
        "layers": pushed,
        "annotations": {
            "dev.erofs-passthrough.source": image.digest,
            RULES_ANNOTATION: CONVERSION_RULES,
        },
    }
    data = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    tag = tag or (f"{ref.tag}-erofs" if ref.tag else f"erofs-{image.digest[7:19]}")
    digest = client.put_manifest(data, OCI_MANIFEST)
    client.put_manifest(data, OCI_MANIFEST, tag)
    erofs_ref = Reference(ref.host, ref.repository, tag, None)
    erofs_image = Image(client, digest, data, manifest, config, image.platform)
    native_layers = [
        dataclasses.replace(c, digest=c.erofs_digest, diff_id=c.erofs_digest) for c in layers
    ]
    signed = _push_root_manifest(
        erofs_image, root_manifest(erofs_image, native_layers, devices), private_key
    )
    return {
        "reference": str(erofs_ref),
        "digest": digest,
        "config": config_desc["digest"],
        "layers": [d["digest"] for d in pushed],
        "media_type": media_type,
        "root_manifest": signed,
        "devices": _roots(devices),
    }


def _copy_prefix(src, dst, size: int) -> None:
    left = size
    while left:
        chunk = src.read(min(left, 1 << 20))
        if not chunk:
            raise PublishError(f"{src.name}: shorter than its {size}-byte image")
        dst.write(chunk)
        left -= len(chunk)


# -- fetch ---------------------------------------------------------------------------------


def fetch_manifest(
    reference: str, out: Path, *, plain_http: bool = False, platform: str = "linux/amd64"
) -> dict[str, Any]:
    """The newest root manifest referring to the image -> OUT/manifest.json + manifest.sig.

    No key is needed (or held): this only finds and checks consistency (digests, subject,
    the image the payload names); `verify_directory` and the guest check the signature. The
    newest by its `created` annotation is taken; if it is damaged, fetch fails rather than
    fall back to an older one (which could be a rollback)."""
    ref = Reference.parse(reference)
    if out.exists() and not out.is_dir():
        raise PublishError(f"{out}: not a directory")
    for name in ("manifest.json", "manifest.sig"):  # both writable, before any work
        if (out / name).exists():
            check_output(out / name)
    image = resolve_image(ref, plain_http, platform)
    client = image.client
    descriptors, via_api = client.referrers(image.digest)
    ours = [d for d in descriptors if d.get("artifactType") == ARTIFACT_TYPE]
    if not ours:
        raise PublishError(f"{ref}: no signed root manifest refers to image {image.digest}")
    newest = max(
        ours, key=lambda d: (str(_dict(d.get("annotations")).get(CREATED, "")), d["digest"])
    )
    artifact, digest = client.get_json(newest["digest"], OCI_MANIFEST)
    subject = _dict(artifact.get("subject")).get("digest")
    if subject != image.digest:
        raise PublishError(f"referrer {digest} has subject {subject}, not {image.digest}")
    if artifact.get("artifactType") != ARTIFACT_TYPE:
        raise PublishError(f"referrer {digest} is not a root manifest artifact")
    blobs = {d.get("mediaType"): d for d in _list(artifact.get("layers")) if isinstance(d, dict)}
    if set(blobs) != {MANIFEST_MEDIA_TYPE, SIGNATURE_MEDIA_TYPE}:
        raise PublishError(f"referrer {digest}: expected one manifest and one signature blob")
    payload = client.get_small_blob(
        check_digest(blobs[MANIFEST_MEDIA_TYPE]["digest"]), MAX_ROOT_MANIFEST_BYTES
    )
    signature = client.get_small_blob(
        check_digest(blobs[SIGNATURE_MEDIA_TYPE]["digest"]), MAX_ROOT_MANIFEST_BYTES
    )
    try:
        claimed = json.loads(payload)
        named = claimed["image"]["digest"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise PublishError(f"referrer {digest}: the root manifest names no image") from None
    if named != image.digest:
        raise PublishError(
            f"referrer {digest}: the root manifest is for image {named}, not {image.digest}"
        )
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "manifest.json", payload)
    write_atomic(out / "manifest.sig", signature)
    return {
        "image": str(ref),
        "image_digest": image.digest,
        "artifact": digest,
        "referrers_api": via_api,
        "created": _dict(newest.get("annotations")).get(CREATED),
        "manifest": str(out / "manifest.json"),
        "signature": str(out / "manifest.sig"),
        "manifest_digest": "sha256:" + hashlib.sha256(payload).hexdigest(),
    }


# -- verify --------------------------------------------------------------------------------


def load_device_roots(path: Path) -> tuple[list[str], list[str]]:
    """(root hashes in device order, diffIDs where known) from a device list: a chain
    directory's fsmeta.json (`{"fsmeta": {...}, "layers": [...]}`) or a JSON list of devices
    (fsmeta first), each with a `root_hash`."""
    try:
        data = json.loads(read_input(path, MAX_DEVICE_LIST_BYTES))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise PublishError(f"{path}: not a JSON device list") from None
    try:
        return device_list_roots(data)
    except DeviceListError as exc:
        raise PublishError(f"{path}: {exc}") from None


def snapshot_devices(spec: Path) -> Path:
    """The device list of a VM-mode snapshot given as ROOT/KEY (ROOT: `serve`'s root, the
    directory with metadata.db; KEY: the snapshot's key, which may contain slashes): its
    parents' layers name the chain directory, `ROOT/fsmeta/<chain key>/fsmeta.json`, as
    `snapshotter.service.vm_mode.ensure_chain_image` publishes it. The metadata is read through a
    read-only connection: a running `serve` is neither blocked nor changed."""
    import sqlite3

    from snapshotter.errors import NotFound
    from snapshotter.service import layer_build
    from snapshotter.service.store import Store
    from snapshotter.service.vm_mode import DESCRIPTION, chain_key

    parts = spec.parts
    for cut in range(len(parts) - 1, 0, -1):
        root = Path(*parts[:cut])
        if (root / "metadata.db").is_file():
            key = "/".join(parts[cut:])
            break
    else:
        raise PublishError(f"{spec}: no snapshotter root (a directory with metadata.db) in it")
    try:
        store = Store.open_read_only(root / "metadata.db")
        try:
            parent_ids = store.ancestors(key)
        finally:
            store.close()
    except NotFound:
        raise PublishError(f"{root}: no snapshot {key!r}") from None
    except sqlite3.Error as exc:
        raise PublishError(f"{root}/metadata.db: {exc}") from None
    metas = []
    for sid in reversed(parent_ids):  # lowest first
        meta = layer_build.read_layer(root / "snapshots" / sid)
        if meta is None:
            raise PublishError(f"snapshot {key!r}: parent {sid} has no layer image")
        metas.append(meta)
    description = root / "fsmeta" / chain_key(metas) / DESCRIPTION
    if not metas or not description.is_file():
        raise PublishError(f"snapshot {key!r} has no VM-mode chain image (not a VM-mode rootfs?)")
    return description


def verify_directory(
    directory: Path,
    trusted_keys: list[Path],
    devices: Path | None = None,
    image_digest: str | None = None,
) -> dict[str, Any]:
    """Check DIRECTORY's manifest.json + manifest.sig against the TRUSTED keys, that it is
    for IMAGE_DIGEST when given, and that every root of the DEVICES list is the signed one."""
    from snapshotter.manifest import ManifestError, check_devices, load_public_key, verify

    keys = []
    for path in trusted_keys:
        try:
            keys.append(load_public_key(read_input(path, MAX_KEY_BYTES)))
        except ManifestError as exc:
            raise PublishError(f"{path}: {exc}") from None
    payload = read_input(directory / "manifest.json", MAX_ROOT_MANIFEST_BYTES)
    signature = read_input(directory / "manifest.sig", MAX_ROOT_MANIFEST_BYTES)
    try:
        signed = verify(payload, signature, keys)
    except ManifestError as exc:
        raise PublishError(f"{directory}: {exc}") from None
    image = _dict(signed.manifest.get("image"))
    try:
        roots = signed.expected_roots()
        signed_ids = [layer.get("diff_id") for layer in signed.manifest["layers"]]
    except (KeyError, TypeError, AttributeError):
        raise PublishError(f"{directory}: the signed manifest has no device list") from None
    if image_digest is not None and image.get("digest") != image_digest:
        raise PublishError(
            f"{directory}: the manifest is signed for image "
            f"{image.get('digest')}, not {image_digest}"
        )
    report: dict[str, Any] = {
        "verified": True,
        "key_id": signed.signature["key_id"],
        "image": image,
        "manifest_digest": signed.digest(),
        "roots": roots,
    }
    if devices is not None:
        device_roots, diff_ids = load_device_roots(devices)
        rules = image.get("conversion")
        try:
            check_devices(signed, device_roots)
        except ManifestError as exc:
            hint = ""
            if rules != CONVERSION_RULES:
                hint = f" (signed under conversion rules {rules}, this node has {CONVERSION_RULES})"
            elif diff_ids and all(diff_ids) and diff_ids != signed_ids:
                hint = " (the device list is of other layers than the signed ones)"
            raise PublishError(
                f"{devices}: {exc}: this node's conversion differs from the publisher's{hint}"
            ) from None
        report["devices"] = str(devices)
    return report
