"""`publish`, `manifest fetch` and `manifest verify` against Debian's docker-registry (the CNCF
distribution server, which has no referrers API) with images pushed by skopeo.

A node's side is an independent conversion with the `convert` and `merge` commands (the
functions the snapshotter runs); its roots must equal the publisher's signed ones, and every
refusal is one line on stderr with nothing written.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from shim_integration.publish import ARTIFACT_TYPE, OCI_EROFS_LAYER
from shim_integration.registry import OCI_MANIFEST, Reference, RegistryClient, sha256_digest
from shim_integration.testbed import local_registry
from shim_integration.testbed.oci_archive import Blob, build_image, layer_tar
from snapshotter.ingest.convert import convert_layer
from snapshotter.ingest.rules import CONVERSION_RULES
from snapshotter.verity import KATA_VERITY
from tests.support import cli
from tests.support.cli import ok_json
from tests.support.helpers import assert_one_line_error
from tests.support.registry import push_image, running_registry

TIMEOUT = 120

LAYERS = [
    [
        ("dir", "etc", 0o755),
        ("file", "etc/hostname", b"publisher\n", 0o644),
        ("dir", "bin", 0o755),
        ("file", "bin/tool", b"\x7fELF" + bytes(9000), 0o755),
    ],
    [("file", "etc/motd", b"layer two\n" * 500, 0o644), ("symlink", "etc/alias", "motd")],
    [("whiteout", "etc/hostname"), ("file", "bin/tool", b"updated", 0o755)],
]
OTHER_LAYERS = [[("dir", "srv", 0o755), ("file", "srv/other", b"another image", 0o644)]]


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """The CLI with its exit status left to the test (refusals are what is checked)."""
    return cli.run_cli(*args, check=False, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[dict]:
    """A registry with a 3-layer image app:v1 and a 1-layer image app:other, a publisher key
    and another key; app:v1 published with --layers."""
    tmp = tmp_path_factory.mktemp("publish")
    with running_registry(tmp) as registry:
        images = {}
        for tag, layers in (("v1", LAYERS), ("other", OTHER_LAYERS)):
            archive = tmp / f"{tag}.tar"
            images[tag] = build_image(layers, f"app:{tag}", archive)
            push_image(archive, f"{registry.host}/demo/app:{tag}", tmp)
        keys = {}
        for name in ("publisher", "stranger"):
            keys[name] = tmp / f"{name}.key"
            ok_json("key", "generate", keys[name])
        published = ok_json(
            "publish",
            f"{registry.host}/demo/app:v1",
            "--key",
            keys["publisher"],
            "--plain-http",
            "--layers",
        )
        yield {
            "tmp": tmp,
            "registry": registry,
            "images": images,
            "keys": keys,
            "published": published,
        }


def node_devices(archive: Path, out: Path, different_layer: int | None = None) -> Path:
    """A node's own conversion of the archive's layers (convert --no-tail-packing + merge as
    the snapshotter runs them), written as a device list in a chain's fsmeta.json shape.
    DIFFERENT_LAYER: that layer converted with other options (an unsalted tree)."""
    out.mkdir()
    with tarfile.open(archive) as tar:
        index = json.load(tar.extractfile("index.json"))
        manifest = json.load(tar.extractfile(f"blobs/sha256/{index['manifests'][0]['digest'][7:]}"))
        layers = []
        for i, desc in enumerate(manifest["layers"], start=1):
            blob = out / f"blob{i}"
            blob.write_bytes(tar.extractfile(f"blobs/sha256/{desc['digest'][7:]}").read())
            erofs = out / f"layer{i}.erofs"
            if i == different_layer:
                r = convert_layer(blob, erofs, verity=KATA_VERITY)
                info = {"size": r.size, "diff_id": r.diff_id, "verity": r.verity.to_json()}
            else:
                # whole blocks, as the differ and `publish` write them (`convert` packs tails)
                info = ok_json("convert", blob, erofs, "--verity", "--no-tail-packing")
            data = erofs.read_bytes()[: info["size"]]
            layers.append(
                {
                    "path": erofs,
                    "diff_id": info["diff_id"],
                    "tag": hashlib.sha256(data).hexdigest(),
                    "root_hash": info["verity"]["root_hash"],
                }
            )
    merged = ok_json(
        "merge",
        out / "image.fsmeta",
        *(d["path"] for d in layers),
        "--verity",
        *(a for d in layers for a in ("--tag", d["tag"])),
    )
    description = {
        "fsmeta": {"root_hash": merged["verity"]["root_hash"], "digest": merged["digest"]},
        "layers": [
            {"device": i, "diff_id": d["diff_id"], "root_hash": d["root_hash"], "tag": d["tag"]}
            for i, d in enumerate(layers, start=1)
        ],
    }
    (out / "fsmeta.json").write_text(json.dumps(description))
    return out / "fsmeta.json"


def test_publish_pushes_a_referrer_a_node_fetches_and_verifies(world, tmp_path):
    registry, published = world["registry"], world["published"]
    ref = f"{registry.host}/demo/app:v1"
    client = RegistryClient(Reference.parse(ref), plain_http=True)
    # every digest --json names is in the registry, and the artifact's subject is the image
    image_digest = published["image_digest"]
    assert client.get_manifest("v1")[2] == image_digest
    artifact, _ = client.get_json(published["root_manifest"]["artifact"], OCI_MANIFEST)
    assert artifact["artifactType"] == ARTIFACT_TYPE
    assert artifact["subject"]["digest"] == image_digest
    assert [d["digest"] for d in artifact["layers"]] == [
        published["root_manifest"]["manifest_blob"],
        published["root_manifest"]["signature_blob"],
    ]
    # docker-registry 2.8 has no referrers API: the referrers tag index names the artifact
    index, index_digest = client.get_json("sha256-" + image_digest[7:])
    assert index_digest == published["root_manifest"]["referrers_index"]
    assert published["root_manifest"]["artifact"] in [d["digest"] for d in index["manifests"]]
    tag = published["root_manifest"]["referrer_tag"]
    assert client.get_manifest(tag)[2] == published["root_manifest"]["artifact"]

    got = ok_json("manifest", "fetch", ref, "--out", tmp_path / "m", "--plain-http")
    assert got["artifact"] == published["root_manifest"]["artifact"]
    assert got["referrers_api"] is False
    signed = json.loads((tmp_path / "m" / "manifest.json").read_bytes())
    assert signed["image"]["digest"] == image_digest
    assert signed["image"]["platform"] == {"os": "linux", "architecture": "amd64"}
    assert signed["image"]["conversion"] == CONVERSION_RULES
    assert [la["diff_id"] for la in signed["layers"]] == world["images"]["v1"]["diff_ids"]

    devices = node_devices(world["tmp"] / "v1.tar", tmp_path / "node")
    report = ok_json(
        "manifest",
        "verify",
        tmp_path / "m",
        "--trust",
        f"{world['keys']['publisher']}.pub",
        "--devices",
        devices,
        "--image",
        image_digest,
    )
    node = json.loads(devices.read_text())
    node_roots = [node["fsmeta"]["root_hash"], *(d["root_hash"] for d in node["layers"])]
    assert report["roots"] == node_roots
    assert published["devices"] == {"fsmeta": node_roots[0], "layers": node_roots[1:]}


def test_layers_image_is_native_erofs_with_its_own_signed_roots(world, tmp_path):
    """--layers: an image of application/vnd.erofs.layer.v1 blobs that are the converted
    layers' EROFS bytes; a node importing them (the differ's native path) gets the roots the
    second signed manifest names, which are the tar image's (one root per layer)."""
    from snapshotter.fsmeta.merge import LayerBlob, merge_layers
    from snapshotter.ingest.convert import import_erofs_image

    published = world["published"]
    erofs = published["erofs_image"]
    client = RegistryClient(Reference.parse(erofs["reference"]), plain_http=True)
    manifest, digest = client.get_json(erofs["reference"].rsplit(":", 1)[1], OCI_MANIFEST)
    assert digest == erofs["digest"]
    assert [d["mediaType"] for d in manifest["layers"]] == [OCI_EROFS_LAYER] * 3
    blobs = []
    for i, desc in enumerate(manifest["layers"]):
        raw = tmp_path / f"raw{i}"
        client.get_blob(desc["digest"], raw)
        out = tmp_path / f"native{i}.erofs"
        with open(raw, "rb") as f:
            r = import_erofs_image(f, out, expected_digest=desc["digest"], verity=True)
        blobs.append((out, r))
    merged = merge_layers(
        [LayerBlob(p, tag=r.blob_digest[7:]) for p, r in blobs],
        tmp_path / "image.fsmeta",
        verity=True,
    )
    roots = [merged.verity.root_hash, *(r.verity.root_hash for _, r in blobs)]
    assert erofs["devices"] == {"fsmeta": roots[0], "layers": roots[1:]}
    # the same bytes arriving as native layers: the tar image's roots (docs/erofs.md)
    assert erofs["devices"] == published["devices"]
    got = tmp_path / "m"
    ok_json("manifest", "fetch", erofs["reference"], "--out", got, "--plain-http")
    (tmp_path / "devices.json").write_text(json.dumps([{"root_hash": h} for h in roots]))
    ok_json(
        "manifest",
        "verify",
        got,
        "--trust",
        f"{world['keys']['publisher']}.pub",
        "--devices",
        tmp_path / "devices.json",
        "--image",
        erofs["digest"],
    )


def test_refuses_a_manifest_signed_by_another_key(world, tmp_path):
    ref = f"{world['registry'].host}/demo/app:v1"
    ok_json("manifest", "fetch", ref, "--out", tmp_path / "m", "--plain-http")
    proc = run_cli(
        "manifest", "verify", tmp_path / "m", "--trust", f"{world['keys']['stranger']}.pub"
    )
    assert_one_line_error(proc, "untrusted key")


def test_refuses_a_manifest_for_another_image(world, tmp_path):
    """A validly signed manifest of app:other served as the referrer of app:v1."""
    registry = world["registry"]
    keys = world["keys"]
    other = ok_json(
        "publish", f"{registry.host}/demo/app:other", "--key", keys["publisher"], "--plain-http"
    )
    ref = f"{registry.host}/demo/app:v1"
    # verify, told which image it is for, refuses the other image's manifest
    ok_json(
        "manifest",
        "fetch",
        f"{registry.host}/demo/app:other",
        "--out",
        tmp_path / "o",
        "--plain-http",
    )
    proc = run_cli(
        "manifest",
        "verify",
        tmp_path / "o",
        "--trust",
        f"{keys['publisher']}.pub",
        "--image",
        world["published"]["image_digest"],
    )
    assert_one_line_error(proc, "signed for image", other["image_digest"])
    # and fetch refuses it when the registry offers it as app:v1's newest referrer
    client = RegistryClient(Reference.parse(ref), plain_http=True)
    data, media_type, digest = client.get_manifest(world["published"]["image_digest"])
    forged, _ = client.get_json(other["root_manifest"]["artifact"], OCI_MANIFEST)
    forged["subject"] = {"mediaType": media_type, "digest": digest, "size": len(data)}
    forged["annotations"]["org.opencontainers.image.created"] = "2999-01-01T00:00:00.000000Z"
    body = json.dumps(forged).encode()
    forged_digest = client.put_manifest(body, OCI_MANIFEST)
    client.push_referrer(
        digest,
        body,
        OCI_MANIFEST,
        {
            "mediaType": OCI_MANIFEST,
            "digest": forged_digest,
            "size": len(body),
            "artifactType": ARTIFACT_TYPE,
            "annotations": forged["annotations"],
        },
    )
    try:
        proc = run_cli("manifest", "fetch", ref, "--out", tmp_path / "f", "--plain-http")
        assert_one_line_error(proc, "is for image", other["image_digest"])
        assert not (tmp_path / "f" / "manifest.json").exists()
    finally:  # the forged artifact out again, for the other tests' fetches
        index, _ = client.get_json("sha256-" + digest[7:])
        index["manifests"] = [d for d in index["manifests"] if d["digest"] != forged_digest]
        client.put_manifest(json.dumps(index).encode(), index["mediaType"], "sha256-" + digest[7:])
        assert (
            requests.delete(
                f"http://{registry.host}/v2/demo/app/manifests/{forged_digest}", timeout=10
            ).status_code
            == 202
        )


def test_refuses_a_node_whose_conversion_differs(world, tmp_path):
    ref = f"{world['registry'].host}/demo/app:v1"
    ok_json("manifest", "fetch", ref, "--out", tmp_path / "m", "--plain-http")
    devices = node_devices(world["tmp"] / "v1.tar", tmp_path / "node", different_layer=2)
    proc = run_cli(
        "manifest",
        "verify",
        tmp_path / "m",
        "--trust",
        f"{world['keys']['publisher']}.pub",
        "--devices",
        devices,
    )
    assert_one_line_error(proc, "device 2", "conversion differs")


def test_refuses_a_referrer_blob_altered_in_the_registry_storage(tmp_path):
    """Its own registry: the altered blob is content-addressed storage the other tests use."""
    with running_registry(tmp_path) as registry:
        build_image(LAYERS[:1], "app:v1", tmp_path / "v1.tar")
        push_image(tmp_path / "v1.tar", f"{registry.host}/demo/app:v1", tmp_path)
        key = tmp_path / "k"
        ok_json("key", "generate", key)
        ref = f"{registry.host}/demo/app:v1"
        published = ok_json("publish", ref, "--key", key, "--plain-http")
        blob = registry.blob_file(published["root_manifest"]["manifest_blob"])
        data = bytearray(blob.read_bytes())
        at = data.index(b'"root_hash":"') + len(b'"root_hash":"')
        data[at] = ord("0") if data[at] != ord("0") else ord("1")
        blob.write_bytes(bytes(data))
        proc = run_cli("manifest", "fetch", ref, "--out", tmp_path / "m", "--plain-http")
        assert_one_line_error(proc, published["root_manifest"]["manifest_blob"], "altered")
        assert not (tmp_path / "m" / "manifest.json").exists()


def test_unreachable_registry_and_bad_reference_are_one_line(tmp_path):
    key = tmp_path / "k"
    ok_json("key", "generate", key)
    start = time.monotonic()
    proc = run_cli(
        "publish",
        f"127.0.0.1:{local_registry.free_port()}/demo/app:v1",
        "--key",
        key,
        "--plain-http",
    )
    assert_one_line_error(proc, "cannot connect")
    assert time.monotonic() - start < 20  # no retry loop with sleeps
    proc = run_cli("manifest", "fetch", "no-host-here", "--out", tmp_path / "m")
    assert_one_line_error(proc, "not an image reference")
    assert not (tmp_path / "m").exists()


def test_concurrent_referrer_additions_lose_none(world):
    """Publishers adding referrers to one subject at once (the referrers tag is a
    read-modify-write): every one ends up in the index. 8 writers, 3 rounds."""
    from concurrent.futures import ThreadPoolExecutor

    registry = world["registry"]
    client = RegistryClient(Reference.parse(f"{registry.host}/demo/race:v1"), plain_http=True)
    empty = client.put_bytes(b"{}")
    for round_ in range(3):
        subject_body = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {"mediaType": "application/vnd.oci.empty.v1+json", **empty},
                "layers": [],
                "annotations": {"round": str(round_)},
            }
        ).encode()
        subject = client.put_manifest(subject_body, OCI_MANIFEST)
        artifacts = []
        for i in range(8):
            body = json.dumps(
                {
                    "schemaVersion": 2,
                    "mediaType": OCI_MANIFEST,
                    "artifactType": ARTIFACT_TYPE,
                    "config": {"mediaType": "application/vnd.oci.empty.v1+json", **empty},
                    "layers": [],
                    "subject": {
                        "mediaType": OCI_MANIFEST,
                        "digest": subject,
                        "size": len(subject_body),
                    },
                    "annotations": {"n": f"{round_}.{i}"},
                }
            ).encode()
            artifacts.append(
                (
                    body,
                    {
                        "mediaType": OCI_MANIFEST,
                        "size": len(body),
                        "digest": sha256_digest(body),
                        "artifactType": ARTIFACT_TYPE,
                    },
                )
            )
        with ThreadPoolExecutor(8) as pool:
            list(
                pool.map(
                    lambda a, s=subject: RegistryClient(client.ref, plain_http=True).push_referrer(
                        s, a[0], OCI_MANIFEST, a[1]
                    ),
                    artifacts,
                )
            )
        found, _ = client.referrers(subject)
        assert {d["digest"] for d in found} == {d["digest"] for _, d in artifacts}


@pytest.fixture
def fetched(world, tmp_path) -> Path:
    ok_json(
        "manifest",
        "fetch",
        f"{world['registry'].host}/demo/app:v1",
        "--out",
        tmp_path / "m",
        "--plain-http",
    )
    return tmp_path / "m"


@pytest.mark.parametrize(
    "case,expected",
    [
        ("missing-dir", "no such file"),
        ("garbage-sig", "not JSON"),
        ("truncated-manifest", "does not verify"),
        ("garbage-key", "not a usable public key"),
        ("fifo-key", "a FIFO, not a regular file"),
        ("garbage-devices", "not a JSON device list"),
        ("rootless-devices", "device 1 has no root_hash"),
        ("short-devices", "2 devices offered, the manifest names 4"),
        ("fifo-devices", "a FIFO, not a regular file"),
    ],
)
def test_verify_bad_input_is_one_line(world, fetched, tmp_path, case, expected):
    trust = Path(f"{world['keys']['publisher']}.pub")
    directory, devices = fetched, None
    bad = tmp_path / "bad"
    if case == "missing-dir":
        directory = tmp_path / "nothing"
    elif case == "garbage-sig":
        (fetched / "manifest.sig").write_bytes(b"\x00garbage")
    elif case == "truncated-manifest":
        data = (fetched / "manifest.json").read_bytes()
        (fetched / "manifest.json").write_bytes(data[:-1])
    elif case == "garbage-key":
        bad.write_bytes(b"-----BEGIN PUBLIC KEY-----\nzz\n")
        trust = bad
    elif case in ("fifo-key", "fifo-devices"):
        os.mkfifo(bad)
        trust, devices = (bad, None) if case == "fifo-key" else (trust, bad)
    else:
        bad.write_text(
            {
                "garbage-devices": "{not json",
                "rootless-devices": json.dumps([{"root_hash": "00"}, {}]),
                "short-devices": json.dumps([{"root_hash": "00"}] * 2),
            }[case]
        )
        devices = bad
    before = {p.name: p.read_bytes() for p in fetched.iterdir()}
    args = ["manifest", "verify", directory, "--trust", trust]
    proc = run_cli(*args, *(["--devices", devices] if devices else []))
    assert_one_line_error(proc, expected)
    assert {p.name: p.read_bytes() for p in fetched.iterdir()} == before


def test_fetch_and_publish_bad_local_input_is_one_line(world, tmp_path):
    host = world["registry"].host
    not_dir = tmp_path / "file"
    not_dir.write_text("x")
    proc = run_cli("manifest", "fetch", f"{host}/demo/app:v1", "--out", not_dir, "--plain-http")
    assert_one_line_error(proc, "not a directory")
    assert not_dir.read_text() == "x"
    proc = run_cli(
        "manifest", "fetch", f"{host}/demo/nothing:v1", "--out", tmp_path / "m", "--plain-http"
    )
    assert_one_line_error(proc, "no such manifest")
    proc = run_cli("publish", f"{host}/demo/app:v1", "--key", tmp_path / "missing", "--plain-http")
    assert_one_line_error(proc, "no such file")
    proc = run_cli("publish", f"{host}/demo/app:v1", "--key", not_dir, "--plain-http")
    assert_one_line_error(proc, "not a usable private key")


def test_verify_against_a_vm_mode_snapshot(world, fetched, tmp_path):
    """The node's real store: the image's layers applied into snapshots as the differ does
    (convert_layer with the snapshotter's layer verity, published into the snapshot, then
    Commit), a VM-mode rootfs prepared over them; `verify --snapshot ROOT/KEY` finds its
    chain's devices and they match the publisher's signed roots."""
    from snapshotter.service import layer_build
    from snapshotter.service.snapshots import Snapshotter
    from tests.support.helpers import require_root, unmount_below

    require_root()
    root = tmp_path / "root"
    sn = Snapshotter(root, vm_mode=True)
    try:
        parent = ""
        with tarfile.open(world["tmp"] / "v1.tar") as tar:
            index = json.load(tar.extractfile("index.json"))
            manifest = json.load(
                tar.extractfile(f"blobs/sha256/{index['manifests'][0]['digest'][7:]}")
            )
            for i, desc in enumerate(manifest["layers"], start=1):
                blob = tmp_path / f"blob{i}"
                blob.write_bytes(tar.extractfile(f"blobs/sha256/{desc['digest'][7:]}").read())
                key = f"default/{i}/extract-{i}"
                sn.prepare(key, parent)
                sid = sn.store.get_snapshot(key).id

                def produce(out: Path, blob: Path = blob) -> layer_build.LayerMeta:
                    r = convert_layer(blob, out, verity=sn.layer_verity, blob_digest=True)
                    return layer_build.LayerMeta(
                        blob_size=r.size,
                        blob_digest=r.blob_digest,
                        root_hash=r.verity.root_hash,
                        salt=r.verity.salt,
                        hash_offset=r.verity.hash_offset,
                        diff_id=r.diff_id,
                    )

                with sn.layout.busy(sid):
                    layer_build.publish_layer(sn.layout.dir(sid), produce)
                parent = f"default/{i}/{world['images']['v1']['diff_ids'][i - 1]}"
                sn.commit(parent, key)
        sn.prepare("default/9/rootfs", parent)
        trust = f"{world['keys']['publisher']}.pub"
        report = ok_json(
            "manifest", "verify", fetched, "--trust", trust, "--snapshot", root / "default/9/rootfs"
        )
        assert report["devices"].endswith("fsmeta.json")
        proc = run_cli(
            "manifest",
            "verify",
            fetched,
            "--trust",
            trust,
            "--snapshot",
            root / "default/9/nothing",
        )
        assert_one_line_error(proc, "no snapshot 'default/9/nothing'")
    finally:
        sn.close()
        unmount_below(tmp_path)


def zstd_archive(layers: list[list[tuple]], out: Path) -> None:
    """An OCI archive of the same layer tars as build_image's, compressed with zstd."""
    import io

    import zstandard

    tars = [layer_tar(entries) for entries in layers]
    blobs = [
        Blob(
            "application/vnd.oci.image.layer.v1.tar+zstd",
            zstandard.ZstdCompressor(level=3).compress(t),
        )
        for t in tars
    ]
    config = Blob(
        "application/vnd.oci.image.config.v1+json",
        json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "config": {"Cmd": ["/bin/sh"]},
                "rootfs": {
                    "type": "layers",
                    "diff_ids": ["sha256:" + hashlib.sha256(t).hexdigest() for t in tars],
                },
            }
        ).encode(),
    )
    manifest = Blob(
        OCI_MANIFEST,
        json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": config.descriptor(),
                "layers": [b.descriptor() for b in blobs],
            }
        ).encode(),
    )
    index = {"schemaVersion": 2, "manifests": [manifest.descriptor()]}
    with tarfile.open(out, "w") as tar:
        for path, data in [
            ("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'),
            ("index.json", json.dumps(index).encode()),
            *((f"blobs/sha256/{b.digest[7:]}", b.data) for b in [config, manifest, *blobs]),
        ]:
            info = tarfile.TarInfo(path)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_same_layers_in_zstd_publish_to_the_same_roots(world, tmp_path):
    """The 3-layer image's layer tars compressed with zstd instead (other blob digests, the
    same diffIDs): the signed roots are the gzip image's, layer by layer and the fsmeta's."""
    registry = world["registry"]
    ref = f"{registry.host}/demo/app:zstd"
    zstd_archive(LAYERS, tmp_path / "zstd.tar")
    push_image(tmp_path / "zstd.tar", ref, tmp_path)
    client = RegistryClient(Reference.parse(ref), plain_http=True)
    manifest, _ = client.get_json("zstd")
    assert {d["mediaType"] for d in manifest["layers"]} == {
        "application/vnd.oci.image.layer.v1.tar+zstd"
    }
    assert not {d["digest"] for d in manifest["layers"]} & set(
        world["images"]["v1"]["layer_digests"]
    )
    zstd = ok_json("publish", ref, "--key", world["keys"]["publisher"], "--plain-http")
    assert zstd["image_digest"] != world["published"]["image_digest"]
    assert zstd["devices"] == world["published"]["devices"]
