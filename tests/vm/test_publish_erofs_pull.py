"""A keyless node pulling the `--layers` image (native EROFS layers) converts nothing.

Debian's docker-registry on 127.0.0.1 holds a 3-layer image pushed by skopeo; `publish
--layers` converts it once and pushes the converted layers as an image of native EROFS layers
(application/vnd.erofs.layer.v1) with its own signed root manifest. A private containerd 1.7
and 2.1, each with our snapshotter and differ and a VM-mode `serve` that holds no key, pulls
that image (`ctr images pull --plain-http`, the reference `publish --json` reported): the
differ's log shows every layer stored as a native EROFS layer and not one tar conversion; a
VM-mode rootfs is prepared over the pulled chain; `manifest fetch` of the native image's root
manifest and `manifest verify --snapshot` against the node's snapshot pass, with the roots the
publisher signed; and the session's TCG guest, trusting only the publisher's key, opens and
reads the image from the node's devices.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from passthrough.agent_client import AgentClient
from passthrough.attach import Attacher
from shim_integration.publish import EROFS_LAYER, OCI_EROFS_LAYER
from shim_integration.registry import OCI_MANIFEST, Reference, RegistryClient
from shim_integration.shim import Shim, plan_from_fetched
from shim_integration.testbed.oci_archive import build_image, chain_ids
from snapshotter.manifest import key_id, load_private_key
from tests.support.containerd import store_key
from tests.support.helpers import require_root, require_tool
from tests.support.published_image import LAYERS, MOTD, PAYLOAD

pytestmark = [pytest.mark.root, pytest.mark.slow]

CLI = [sys.executable, "-m", "shim_integration.cli"]
TIMEOUT = 300
ROOTFS_KEY = "native-rootfs"
SUITES = {"1.7": "trixie", "2.1": "sid"}


def cli_json(*args: str | Path) -> dict:
    proc = subprocess.run(
        [*CLI, *map(str, args), "--json"], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@dataclass(frozen=True)
class Published:
    tmp: Path
    source: str  # the tar image's reference
    report: dict  # what `publish --layers --json` printed
    publisher_key: Path


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory, guest_key: Path) -> Iterator[Published]:
    """A registry holding a 3-layer tar image published with `--layers`. The publisher's key
    is the one the session's TCG guest trusts; it lives in its own directory, and nothing the
    node runs is given it."""
    from shim_integration.testbed.local_registry import push_archive, running_registry

    require_root()
    require_tool("docker-registry")
    require_tool("skopeo")
    tmp = tmp_path_factory.mktemp("native-pull")
    publisher = guest_key
    with running_registry(tmp) as registry:
        build_image(LAYERS, "app:v1", tmp / "v1.tar")
        source = f"{registry.host}/demo/app:v1"
        push_archive(tmp / "v1.tar", source, tmp)
        report = cli_json("publish", source, "--key", publisher, "--plain-http", "--layers")
        yield Published(tmp, source, report, publisher)


@dataclass(frozen=True)
class PulledNode:
    version: str
    serve_root: Path
    service_log: Path
    mounts: list
    fetched: Path


@pytest.fixture(scope="module", params=sorted(SUITES))
def node(
    request: pytest.FixtureRequest, published: Published, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PulledNode]:
    """A keyless VM-mode node on containerd 1.7 or 2.1 that pulled the `--layers` image and
    prepared a rootfs over its chain."""
    from shim_integration.testbed.containerd_dist import from_suite
    from shim_integration.testbed.containerd_private import SNAPSHOTTER, Snapshots, Stack

    version = request.param
    dist = from_suite(SUITES[version])
    assert f"{dist.major_minor[0]}.{dist.major_minor[1]}" == version, dist
    serve_config = published.tmp / f"serve-{version}.toml"
    serve_config.write_text("vm_mode = true\n")  # no signing_key: the node holds none
    stack_dir = Path(tmp_path_factory.mktemp("n", numbered=True))  # short socket paths
    stack = Stack(
        dist, stack_dir, differ=True, service_args=["--config", str(serve_config)]
    ).start()
    snapshots = None
    try:
        erofs = published.report["erofs_image"]
        stack.containerd.ctr(
            "images",
            "pull",
            "--plain-http",
            "--snapshotter",
            SNAPSHOTTER,
            erofs["reference"],
            timeout=TIMEOUT,
        )
        snapshots = Snapshots(stack.containerd.socket)
        mounts = snapshots.prepare(
            ROOTFS_KEY,
            chain_ids(erofs["layers"])[-1],
            {"containerd.io/gc.root": time.strftime("%FT%TZ")},
        )
        fetched = published.tmp / f"fetched-{version}"
        cli_json("manifest", "fetch", erofs["reference"], "--out", fetched, "--plain-http")
        yield PulledNode(version, stack.service.root, stack.service.log, mounts, fetched)
    finally:
        if snapshots is not None:
            snapshots.close()
        stack.stop()


def _log_records(path: Path) -> list[dict]:
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def test_publish_layers_reports_a_native_erofs_image(published: Published) -> None:
    erofs = published.report["erofs_image"]
    assert erofs["reference"] == published.source + "-erofs"
    client = RegistryClient(Reference.parse(erofs["reference"]), plain_http=True)
    manifest, digest = client.get_json(erofs["digest"], OCI_MANIFEST)
    assert digest == erofs["digest"]
    assert [d["mediaType"] for d in manifest["layers"]] == [OCI_EROFS_LAYER] * 3
    assert [d["digest"] for d in manifest["layers"]] == erofs["layers"]
    assert len(erofs["layers"]) == 3
    assert erofs["root_manifest"]["subject"] == erofs["digest"]
    assert len(erofs["devices"]["layers"]) == 3
    assert erofs["media_type"] == OCI_EROFS_LAYER


def test_both_images_manifests_sign_the_same_roots(published: Published, tmp_path: Path) -> None:
    """One root per layer whichever way it arrives: the tar image's and the EROFS image's
    signed manifests (fetched from the registry, not `publish`'s report) name the same
    layer and fsmeta roots; only the image each is bound to, and the layers' digests, differ."""
    erofs = published.report["erofs_image"]
    assert erofs["devices"] == published.report["devices"]
    signed = {}
    for name, ref in (("tar", published.source), ("erofs", erofs["reference"])):
        cli_json("manifest", "fetch", ref, "--out", tmp_path / name, "--plain-http")
        signed[name] = json.loads((tmp_path / name / "manifest.json").read_text())
    roots = {
        name: (
            [layer["verity"]["root_hash"] for layer in m["layers"]],
            m["fsmeta"]["verity"]["root_hash"],
        )
        for name, m in signed.items()
    }
    assert roots["tar"] == roots["erofs"]
    assert roots["tar"] == (
        published.report["devices"]["layers"],
        published.report["devices"]["fsmeta"],
    )
    assert signed["tar"]["image"]["digest"] == published.report["image_digest"]
    assert signed["erofs"]["image"]["digest"] == erofs["digest"]
    assert [layer["diff_id"] for layer in signed["erofs"]["layers"]] == erofs["layers"]


def test_publish_layers_with_the_erofs_media_type(published: Published) -> None:
    """`--layer-media-type application/vnd.erofs.layer.v1` (containerd 2.3+'s erofs differ):
    the same layer blobs under that name, the same roots; a third name is refused."""
    source = published.source
    report = cli_json(
        "publish",
        source,
        "--key",
        published.publisher_key,
        "--plain-http",
        "--layers",
        "--layers-tag",
        "v1-erofs-vnd",
        "--layer-media-type",
        EROFS_LAYER,
    )
    erofs = report["erofs_image"]
    assert erofs["reference"] == source + "-erofs-vnd"
    client = RegistryClient(Reference.parse(erofs["reference"]), plain_http=True)
    manifest, _ = client.get_json(erofs["digest"], OCI_MANIFEST)
    assert [d["mediaType"] for d in manifest["layers"]] == [EROFS_LAYER] * 3
    assert erofs["layers"] == published.report["erofs_image"]["layers"]
    assert erofs["devices"] == report["devices"] == published.report["devices"]
    proc = subprocess.run(
        [
            *CLI,
            "publish",
            source,
            "--key",
            str(published.publisher_key),
            "--layers",
            "--layer-media-type",
            "application/vnd.erofs.layer.v2",
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode != 0 and "invalid choice" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_node_pulling_the_layers_image_converts_nothing(
    node: PulledNode, published: Published
) -> None:
    """containerd routed every native layer to our differ (not its walking differ, which
    would fail on a non-tar layer), and the differ stored each without converting."""
    erofs = published.report["erofs_image"]
    records = _log_records(node.service_log)
    messages = [r.get("msg") for r in records]
    assert "converting layer" not in messages, node.service_log.read_text()[-4000:]
    native = [r for r in records if r.get("msg") == "stored native EROFS layer"]
    assert sorted(r["digest"] for r in native) == sorted(erofs["layers"])
    assert all(r["conversions"] == 0 for r in native)
    assert [r["native_layers"] for r in native] == [1, 2, 3]


def test_node_snapshot_verifies_against_the_native_images_manifest(
    node: PulledNode, published: Published
) -> None:
    erofs = published.report["erofs_image"]
    fetched = node.fetched
    plan = plan_from_fetched(node.mounts, fetched)
    roots = [d.root_hash for d in plan.devices]
    assert len(roots) == 4  # the fsmeta and three layers
    assert erofs["devices"] == {"fsmeta": roots[0], "layers": roots[1:]}
    key = store_key(node.serve_root, ROOTFS_KEY)
    report = cli_json(
        "manifest",
        "verify",
        fetched,
        "--trust",
        f"{published.publisher_key}.pub",
        "--snapshot",
        node.serve_root / key,
        "--image",
        erofs["digest"],
    )
    assert report["roots"] == roots


@pytest.mark.qemu
def test_guest_trusting_only_the_publisher_reads_the_pulled_native_image(
    node: PulledNode, published: Published, agent: AgentClient, attacher: Attacher
) -> None:
    shim = Shim(attacher, agent)
    plan = plan_from_fetched(node.mounts, node.fetched)
    image = shim.open(plan, "native-" + node.version.replace(".", "-"))
    try:
        publisher = key_id(load_private_key(published.publisher_key).public_key())
        assert image.result["key_id"] == publisher
        assert [d["root_hash"] for d in image.result["devices"]] == [
            d.root_hash for d in plan.devices
        ]
        assert agent.read_file(f"{image.rootfs}/etc/motd") == MOTD
        assert agent.read_file(f"{image.rootfs}/data/payload.bin") == PAYLOAD
        tree = agent.hash_tree(image.rootfs)
        assert tree["data/link"]["target"] == "payload.bin"
        assert "data/gone" not in tree
    finally:
        shim.close(image)
