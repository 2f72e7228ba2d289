"""A node without a key (docs/publish.md): the publisher signs, the node only
pulls, and the guest trusts only the publisher.

Debian's docker-registry on 127.0.0.1 holds a 3-layer image pushed by skopeo, published
(`erofs-passthrough publish`) with a key that lives in its own directory and that the node's
`serve` config never names. A private containerd 1.7 pulls the image (`ctr images pull
--plain-http`) through our snapshotter and differ, in VM mode with no signing key; a VM-mode
rootfs is prepared through containerd's Snapshots API; `manifest fetch` brings the publisher's
signed manifest and `manifest verify --snapshot` matches it against the node's own snapshot.
The session's TCG guest (tests/support/guest_fixtures) trusts exactly one key, `guest_key`: here it
is the publisher's key, so the guest trusts only the publisher.
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
from shim_integration.shim import ImageRefused, Shim, ShimError, plan_from_fetched, plan_from_mounts
from shim_integration.testbed.oci_archive import build_image, chain_ids
from snapshotter.manifest import generate_key, key_id, load_private_key, sign
from tests.support.containerd import store_key
from tests.support.helpers import require_root, require_tool
from tests.support.published_image import LAYERS, MOTD, PAYLOAD

pytestmark = [pytest.mark.qemu, pytest.mark.root, pytest.mark.slow]

CLI = [sys.executable, "-m", "shim_integration.cli"]
TIMEOUT = 300
ROOTFS_KEY = "node-rootfs"
OTHER_LAYERS = [[("dir", "srv", 0o755), ("file", "srv/other", b"another image\n", 0o644)]]


def cli_json(*args: str | Path) -> dict:
    proc = subprocess.run(
        [*CLI, *map(str, args), "--json"], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@dataclass(frozen=True)
class Node:
    tmp: Path
    registry_host: str
    reference: str
    published: dict
    publisher_key: Path
    serve_config: Path
    serve_root: Path
    mounts: list
    fetched: Path


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, guest_key: Path) -> Iterator[Node]:
    """Registry, published image, and a keyless node that pulled it and prepared a rootfs."""
    from shim_integration.testbed.containerd_dist import from_suite
    from shim_integration.testbed.containerd_private import SNAPSHOTTER, Snapshots, Stack
    from shim_integration.testbed.local_registry import push_archive, running_registry

    require_root()
    require_tool("docker-registry")
    require_tool("skopeo")
    tmp = tmp_path_factory.mktemp("node")
    dist = from_suite("trixie")
    assert dist.major_minor == (1, 7), dist
    with running_registry(tmp) as registry:
        images = {}
        for tag, layers in (("v1", LAYERS), ("other", OTHER_LAYERS)):
            images[tag] = build_image(layers, f"app:{tag}", tmp / f"{tag}.tar")
            push_archive(tmp / f"{tag}.tar", f"{registry.host}/demo/app:{tag}", tmp)
        reference = f"{registry.host}/demo/app:v1"
        # The publisher's key is the one the shared guest trusts; it lives in its own
        # directory, and nothing the node runs is given it.
        published = cli_json("publish", reference, "--key", guest_key, "--plain-http")
        cli_json("publish", f"{registry.host}/demo/app:other", "--key", guest_key, "--plain-http")

        serve_config = tmp / "serve.toml"
        serve_config.write_text("vm_mode = true\n")  # no signing_key: the node holds none
        # Short socket paths: containerd's sockets live below the stack directory.
        stack_dir = Path(tmp_path_factory.mktemp("s", numbered=True))
        stack = Stack(
            dist, stack_dir, differ=True, service_args=["--config", str(serve_config)]
        ).start()
        snapshots = None
        try:
            stack.containerd.ctr(
                "images", "pull", "--plain-http", "--snapshotter", SNAPSHOTTER, reference
            )
            chains = chain_ids(images["v1"]["diff_ids"])
            snapshots = Snapshots(stack.containerd.socket)
            mounts = snapshots.prepare(
                ROOTFS_KEY, chains[-1], {"containerd.io/gc.root": time.strftime("%FT%TZ")}
            )
            fetched = tmp / "fetched"
            cli_json("manifest", "fetch", reference, "--out", fetched, "--plain-http")
            yield Node(
                tmp,
                registry.host,
                reference,
                published,
                guest_key,
                serve_config,
                stack.service.root,
                mounts,
                fetched,
            )
        finally:
            if snapshots is not None:
                snapshots.close()
            stack.stop()


@pytest.fixture
def shim(agent: AgentClient, attacher: Attacher) -> Shim:
    return Shim(attacher, agent)


def test_keyless_node_pulls_and_its_snapshot_verifies_against_the_publisher(node: Node) -> None:
    assert "signing_key" not in node.serve_config.read_text()
    # the node signed nothing: no manifest beside its fsmeta, so a plan needs the fetched one
    with pytest.raises(ShimError, match="no signed manifest beside the fsmeta"):
        plan_from_mounts(node.mounts)
    plan = plan_from_fetched(node.mounts, node.fetched)
    key = store_key(node.serve_root, ROOTFS_KEY)
    report = cli_json(
        "manifest",
        "verify",
        node.fetched,
        "--trust",
        f"{node.publisher_key}.pub",
        "--snapshot",
        node.serve_root / key,
        "--image",
        node.published["image_digest"],
    )
    roots = [d.root_hash for d in plan.devices]
    assert report["roots"] == roots
    assert len(roots) == 4  # the fsmeta and three layers
    assert node.published["devices"] == {"fsmeta": roots[0], "layers": roots[1:]}


def test_guest_trusting_only_the_publisher_opens_and_reads_the_image(
    node: Node, shim: Shim, agent: AgentClient
) -> None:
    plan = plan_from_fetched(node.mounts, node.fetched)
    image = shim.open(plan, "published")
    try:
        publisher = key_id(load_private_key(node.publisher_key).public_key())
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


def test_guest_refuses_a_manifest_signed_by_another_key(
    node: Node, shim: Shim, agent: AgentClient, attacher: Attacher, tmp_path: Path
) -> None:
    """The same manifest bytes, signed by a key the guest does not trust (a node's own, say):
    the host-side plan accepts it (its roots are right), the guest refuses, nothing opened."""
    stranger = tmp_path / "stranger.key"
    generate_key(stranger)
    payload = (node.fetched / "manifest.json").read_bytes()
    resigned_payload, signature = sign(json.loads(payload), load_private_key(stranger))
    assert resigned_payload == payload
    forged = tmp_path / "forged"
    forged.mkdir()
    (forged / "manifest.json").write_bytes(payload)
    (forged / "manifest.sig").write_text(json.dumps(signature))
    plan = plan_from_fetched(node.mounts, forged)
    with pytest.raises(ImageRefused, match="untrusted key"):
        shim.open(plan, "stranger")
    assert agent.call("images") == {"images": {}}
    assert agent.call("mounts") == {"mounts": [], "dm": []}
    assert attacher.attached() == []


def test_shim_refuses_a_fetched_manifest_of_another_image(node: Node, tmp_path: Path) -> None:
    """The publisher's validly signed manifest of app:other is not this rootfs: refused on
    the node, in one line naming the mismatch, before anything is attached."""
    other = tmp_path / "other"
    cli_json(
        "manifest", "fetch", f"{node.registry_host}/demo/app:other", "--out", other, "--plain-http"
    )
    with pytest.raises(ShimError) as refused:
        plan_from_fetched(node.mounts, other)
    message = str(refused.value)
    assert "\n" not in message
    assert "does not describe this rootfs" in message
    assert "4 devices offered, the manifest names 2" in message
    with pytest.raises(ShimError, match="no fetched manifest"):
        plan_from_fetched(node.mounts, tmp_path / "nothing")


def test_demo_registry_path_the_node_holds_no_key() -> None:
    """`demo --registry`: the publisher signs beside the image in a local registry, the node
    pulls with no key, the guest trusts only the publisher and still proves both things."""
    from tests.support.guest_fixtures import require_guest

    require_guest()
    for tool in ("docker-registry", "skopeo", "busybox"):
        require_tool(tool)
    proc = subprocess.run(
        [*CLI, "demo", "--registry", "--json"], capture_output=True, text=True, timeout=600
    )
    print(proc.stderr)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["verified_read"] is True and report["tamper_detected"] is True
    assert report["node_signing_key"] is False
    assert report["guest_key_id"] == report["key_id"]  # the publisher's key, the only trusted
    assert report["published"]["reference"].startswith("127.0.0.1:")
    assert "ctr images pull --plain-http" in proc.stderr
    assert "trusting only the publisher's key" in proc.stderr
    assert "not the signed device" in report["swap_refused"]
    assert report["manifest_digest"] == report["guest_manifest_digest"]
    assert not Path(report["work_dir"]).exists()


def test_guest_refuses_another_images_manifest_a_node_hands_it_unchecked(
    node: Node, shim: Shim, agent: AgentClient, attacher: Attacher, tmp_path: Path
) -> None:
    """A host that skips the shim's check and offers this rootfs's devices with the
    publisher's (validly signed) manifest of app:other: the guest refuses, nothing opened."""
    other = tmp_path / "other"
    cli_json(
        "manifest", "fetch", f"{node.registry_host}/demo/app:other", "--out", other, "--plain-http"
    )
    plan = plan_from_mounts(
        node.mounts,
        manifest=(other / "manifest.json").read_bytes(),
        signature=(other / "manifest.sig").read_bytes(),
    )
    with pytest.raises(ImageRefused, match="4 devices offered, the manifest names 2"):
        shim.open(plan, "other")
    assert agent.call("images") == {"images": {}}
    assert agent.call("mounts") == {"mounts": [], "dm": []}
    assert attacher.attached() == []
