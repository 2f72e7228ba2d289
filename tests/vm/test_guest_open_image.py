"""Signed images in a booted guest: the shim attaches a VM-mode rootfs (our snapshotter's fsmeta
and layer blobs, its signed manifest), the guest agent verifies the signature against the key
it booted with and every offered disk's root hash, and only then opens dm-verity, mounts and
overlays. Every way the host can lie is refused with the reason, leaving nothing behind.

Uses the session's shared guest (tests/support/guest_fixtures.py), which trusts `guest_key`.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from passthrough.agent_client import AgentClient
from passthrough.attach import Attacher
from passthrough.errors import AgentFailure
from passthrough.guest.files import hash_tree
from passthrough.vm import Vm
from shim_integration.shim import AttachPlan, ImageRefused, Shim, plan_from_mounts
from snapshotter.manifest import generate_key, load_private_key, sign
from snapshotter.service.snapshots import Snapshotter
from tests.support.guest_fixtures import assert_clean
from tests.support.helpers import mounted_fsmeta, require_root, require_tool, unmount_below

pytestmark = [pytest.mark.qemu, pytest.mark.root, pytest.mark.slow]

MESSAGE = b"hello from layer 3\n"


def _write_layer(fs: Path, n: int, busybox: bytes) -> None:
    """What containerd's applier leaves in an upper dir: files, 0:0 whiteouts, opaque dirs."""
    data = fs / "data"
    data.mkdir(exist_ok=True)
    if n == 1:
        (fs / "bin").mkdir()
        (fs / "bin" / "busybox").write_bytes(busybox)
        (fs / "bin" / "busybox").chmod(0o755)
        (fs / "bin" / "sh").symlink_to("busybox")
        (data / "gone").write_text("removed by layer 2\n")
        (data / "opq").mkdir()
        (data / "opq" / "hidden").write_text("hidden by layer 2\n")
        (data / "big.bin").write_bytes(hashlib.sha256(b"big").digest() * 8192)
    elif n == 2:
        os.mknod(data / "gone", stat.S_IFCHR | 0o600, os.makedev(0, 0))
        (data / "opq").mkdir()
        os.setxattr(data / "opq", "trusted.overlay.opaque", b"y")
        (data / "opq" / "new").write_text("new in layer 2\n")
    else:
        (data / "message").write_bytes(MESSAGE)


@dataclass(frozen=True)
class Chain:
    plan: AttachPlan
    fsmeta: Path
    blobs: list[Path]


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory, guest_key: Path) -> Iterator[Chain]:
    """A three-layer chain committed through our snapshotter (convert on Commit) and a VM-mode
    container rootfs over it, signed with the key the guest trusts."""
    require_root()
    busybox = Path(require_tool("busybox")).read_bytes()
    root = tmp_path_factory.mktemp("chain")
    sn = Snapshotter(root / "sn", vm_mode=True, signing_key=guest_key)
    parent = ""
    for n in (1, 2, 3):
        key = f"default/{n}/extract-{n}"
        mounts = sn.prepare(key, parent)
        fs = (
            Path(mounts[0].source)
            if mounts[0].type == "bind"
            else next(
                Path(o.split("=", 1)[1]) for o in mounts[0].options if o.startswith("upperdir=")
            )
        )
        _write_layer(fs, n, busybox)
        sn.commit(f"default/{n}/sha256:layer{n}", key)
        parent = f"default/{n}/sha256:layer{n}"
    mounts = sn.prepare("default/9/container", parent)
    plan = plan_from_mounts(
        mounts, ["virtio-blk", "vhost-user-blk", "virtio-blk", "vhost-user-blk"]
    )
    yield Chain(plan, Path(plan.devices[0].path), [Path(d.path) for d in plan.devices[1:]])
    sn.close()
    unmount_below(root)


@pytest.fixture
def shim(agent: AgentClient, attacher: Attacher) -> Shim:
    return Shim(attacher, agent)


def _host_tree(chain: Chain) -> dict:
    """The merged image as the host kernel shows it, in the agent's own hash_tree terms."""
    with mounted_fsmeta(chain.fsmeta, chain.blobs) as mnt:
        return hash_tree(str(mnt))["entries"]


def test_signed_image_opens_and_reads_what_the_host_sees(
    chain: Chain, shim: Shim, agent: AgentClient, guest_key: Path
) -> None:
    image = shim.open(chain.plan, "good")
    result = image.result
    assert result["manifest_digest"] == "sha256:" + hashlib.sha256(chain.plan.manifest).hexdigest()
    signature = json.loads(chain.plan.signature)
    assert result["key_id"] == signature["key_id"]
    assert [d["root_hash"] for d in result["devices"]] == [d.root_hash for d in chain.plan.devices]
    assert [d["role"] for d in result["devices"]] == ["fsmeta", "layer", "layer", "layer"]
    assert agent.call("images")["images"]["good"]["manifest_digest"] == image.manifest_digest

    tree = agent.hash_tree(image.rootfs)
    assert tree == _host_tree(chain)
    assert "data/gone" not in tree and "data/opq/hidden" not in tree and "data/opq/new" in tree
    assert not [n for n in tree if "errno" in tree[n]]

    ran = agent.run(
        "/bin/busybox",
        "sh",
        "-c",  # chrooted into the image's root
        "busybox cat /data/message; echo written > /data/new; busybox cat /data/new; "
        "busybox ls /data",
        image=image.name,
    )
    assert ran["rc"] == 0 and not ran["stderr"], ran
    assert ran["stdout"].split("\n") == [
        MESSAGE.decode().strip(),
        "written",
        "big.bin",
        "message",
        "new",
        "opq",
        "",
    ]
    # the write went to the tmpfs upper; the verified lower is untouched (and read-only)
    assert agent.read_file(f"{result['upper']}/data/new") == b"written\n"
    lower = agent.run("sh", "-c", f"echo x > {result['lower']}/data/x")
    assert lower["rc"] != 0 and "Read-only file system" in lower["stderr"]
    # Links made inside the image resolve the way the image sees them and never lead out of
    # it, whatever they point at (openat2 with RESOLVE_IN_ROOT in the agent).
    made = agent.run(
        "/bin/busybox",
        "sh",
        "-c",
        "busybox ln -s /data/message /data/abs; "
        "busybox ln -s ../../../../../../../proc/cmdline /data/up",
        image=image.name,
    )
    assert made["rc"] == 0, made
    assert agent.read_file(f"{image.rootfs}/data/abs") == MESSAGE
    with pytest.raises(AgentFailure, match="No such file"):
        agent.read_file(f"{image.rootfs}/data/up")  # the image has no /proc/cmdline
    for i in range(4):
        assert agent.verity_status(f"good-{i}")["corrupted"] is False
    shim.close(image)
    # the autouse fixture checks the guest, QEMU and the storage daemon are clean again


def test_two_images_share_devices_until_the_last_closes(
    chain: Chain, shim: Shim, agent: AgentClient, attacher: Attacher
) -> None:
    first = shim.open(chain.plan, "first")
    second = shim.open(chain.plan, "second")
    assert len(attacher.attached()) == 4  # the same files: attached once
    shim.close(first)
    assert len(attacher.attached()) == 4
    assert agent.read_file(f"{second.rootfs}/data/message") == MESSAGE
    shim.close(second)
    assert attacher.attached() == []


def _resigned(plan: AttachPlan, key: Path, change) -> AttachPlan:
    manifest = json.loads(plan.manifest)
    change(manifest)
    payload, signature = sign(manifest, load_private_key(key))
    return replace(plan, manifest=payload, signature=json.dumps(signature).encode())


def _case(name: str, plan: AttachPlan, tmp_path: Path, guest_key: Path) -> AttachPlan:
    paths = [d.path for d in plan.devices]
    sig = plan.signature
    if name == "untrusted-key":
        generate_key(tmp_path / "other")
        return _resigned(plan, tmp_path / "other", lambda m: None)
    if name == "truncated-signature-file":
        return replace(plan, signature=sig[: len(sig) // 2])
    if name == "truncated-signature":
        envelope = json.loads(sig)
        envelope["signature"] = envelope["signature"][:-8]
        return replace(plan, signature=json.dumps(envelope).encode())
    if name == "manifest-changed-after-signing":
        return replace(plan, manifest=plan.manifest.replace(b'"layers"', b'"layers" ', 1))
    if name == "root-differs-from-device":

        def bump(m: dict) -> None:
            root = m["layers"][1]["verity"]["root_hash"]
            m["layers"][1]["verity"]["root_hash"] = root[:-1] + ("0" if root[-1] != "0" else "1")

        return _resigned(plan, guest_key, bump)
    if name == "swapped-layer-devices":
        return plan.with_paths([paths[0], paths[2], paths[1], paths[3]])
    if name == "layer-offered-as-fsmeta":
        return plan.with_paths([paths[1], paths[0], paths[2], paths[3]])
    if name == "device-missing":
        return replace(plan, devices=plan.devices[:-1])
    if name == "tampered-layer-with-recomputed-tree":
        # a changed byte and a fresh, self-consistent tree with the signed salt: only the root
        # (which the host cannot make match) tells it apart
        dev = plan.devices[3].description
        fake = tmp_path / "fake.erofs"
        data = bytearray(Path(paths[3]).read_bytes()[: dev["verity"]["hash_offset"]])
        data[-4096 - 100] ^= 1
        fake.write_bytes(bytes(data))
        subprocess.run(
            [
                sys.executable,
                "-m",
                "shim_integration.cli",
                "verity",
                "format",
                str(fake),
                "--salt",
                dev["verity"]["salt"],
            ],
            check=True,
            capture_output=True,
        )
        return plan.with_paths([*paths[:3], str(fake)])
    raise AssertionError(name)


REFUSALS = {
    "untrusted-key": "signed by an untrusted key sha256:",
    "truncated-signature-file": "signature file is not JSON",
    "truncated-signature": "signature (is not base64|does not verify)",
    "manifest-changed-after-signing": "signature does not verify",
    "root-differs-from-device": r"device 2: root hash [0-9a-f]{64} is not the signed [0-9a-f]{64}",
    "swapped-layer-devices": "device 1 .*not the signed device",
    "layer-offered-as-fsmeta": "fsmeta .*not the signed device",
    "device-missing": "3 devices offered, the manifest names 4",
    "tampered-layer-with-recomputed-tree": r"device 3: root hash .* is not the signed",
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_the_guest_refuses_with_the_reason_and_opens_nothing(
    case: str,
    chain: Chain,
    shim: Shim,
    vm: Vm,
    agent: AgentClient,
    attacher: Attacher,
    tmp_path: Path,
    guest_key: Path,
) -> None:
    plan = _case(case, chain.plan, tmp_path, guest_key)
    with pytest.raises(ImageRefused, match=REFUSALS[case]) as refused:
        shim.open(plan, "bad")
    print(f"{case}: {refused.value.reason}")
    # Checked before any teardown: no dm device, no mount, no image, every disk detached.
    assert_clean(vm, agent, attacher)
