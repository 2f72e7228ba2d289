"""`erofs-passthrough demo`: the whole path end to end in a TCG guest, printing what it proves.

1. build a small OCI image (Debian's static busybox plus data; three layers with whiteouts and
   an opaque directory) and a signing key for this run;
2. start a private containerd (by default Debian trixie's 1.7, fetched once and cached; or the
   machine's 1.6 with `--containerd system`, or one in a directory) with
   `erofs-passthrough serve` as its snapshotter (VM mode, the signing key; also as its differ
   where containerd has diff proxies, 1.7+) and `ctr images import` the image through it:
   every layer becomes an EROFS blob with a dm-verity tree;
3. Prepare a container rootfs through containerd's Snapshots API: VM-mode mounts, i.e. the
   chain's fsmeta, the layer blobs, every root hash, and the signed manifest beside them;
4. boot the guest (Debian's 6.1 kernel under TCG, its own root verified) trusting only the
   demo's public key; attach the devices; the agent verifies signature and root hashes, opens
   dm-verity, mounts, overlays; a command runs chrooted in the image and every file is checked
   against what the image holds;
5. offer the guest swapped layer devices (refused before anything is opened), then a copy of a
   layer blob with one byte of file data flipped: that file reads as EIO; and the agent, in
   lockdown, refuses to open a disk without a signed manifest at all.

By default the node signs: `serve` holds the demo's signing key, which is a shape for tests and
demos only (a key on the host signs whatever the host likes: docs/kata.md). With `--registry` the
node holds no key: a local docker-registry gets the image (skopeo), a publisher whose key lives
in its own temporary directory runs `erofs-passthrough publish` against it, the node's `serve`
has no signing_key and pulls the image (`ctr images pull --plain-http`), fetches the
publisher's signed manifest from the registry, and the guest boots trusting only the
publisher's public key.

With `--json` the progress goes to stderr and stdout gets one JSON object: `verified_read`,
`tamper_detected`, the root hashes, the manifest digest, the key the guest accepted
(`guest_key_id`), whether the node held a key (`node_signing_key`; with `--registry` also
`published`: reference, image digest, referrer), and timings per step. The exit status
is non-zero unless both proofs hold.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from passthrough.errors import Refused
from snapshotter.errors import EpError, FailedPrecondition, NotFound
from snapshotter.verity import VerityInfo

IMAGE = "example.com/erofs-passthrough/demo:1"
BUSYBOX = Path("/bin/busybox")  # Debian's busybox-static
ROOTFS_KEY = "erofs-demo-rootfs"
STEPS = 9  # and one more when a containerd is fetched
COMMAND = "cat /etc/motd /data/message; ls -l /data; md5sum /data/payload.bin"
MESSAGE = b"verified by the guest, from layer 3\n"
MOTD = b"erofs-passthrough demo image\n"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run the whole path end to end in a TCG guest and show what it proves",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="progress on stderr; one JSON object (proofs, roots, timings) on stdout",
    )
    p.add_argument(
        "--transport",
        choices=("virtio-blk", "vhost-user-blk"),
        default="virtio-blk",
        help="how the devices reach the guest",
    )
    p.add_argument(
        "--containerd",
        default="trixie",
        metavar="trixie|sid|system|BIN_DIR",
        help="which containerd: a Debian suite's (trixie: 1.7, sid: 2.x; fetched "
        "once, cached), the machine's (system: 1.6 on Debian 12), or the one in "
        "BIN_DIR. 1.7+ unpacks through our differ (default: trixie)",
    )
    p.add_argument(
        "--registry",
        action="store_true",
        help="the node holds no key: a local registry (docker-registry, skopeo) gets "
        "the image, a publisher signs it there, the node pulls and fetches the "
        "signed manifest, the guest trusts only the publisher",
    )
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.set_defaults(func=run)


def _payload() -> bytes:
    out = bytearray()
    for i in range(2048):  # 64 KiB of pseudo-random bytes: the file the tamper step hits
        out += hashlib.sha256(b"demo payload %d" % i).digest()
    return bytes(out)


def demo_layers(busybox: bytes) -> list[list[tuple]]:
    """Layer specs (shim_integration.testbed.oci_archive) of the demo image, lowest first."""
    applets = [("symlink", f"bin/{name}", "busybox") for name in ("sh", "cat", "ls", "md5sum")]
    return [
        [
            ("dir", "bin", 0o755),
            ("file", "bin/busybox", busybox, 0o755),
            *applets,
            ("dir", "etc", 0o755),
            ("file", "etc/motd", MOTD, 0o644),
            ("dir", "data", 0o755),
            ("file", "data/message", b"layer 1 says hello\n", 0o644),
            ("file", "data/gone", b"removed by layer 2\n", 0o644),
            ("dir", "data/olddir", 0o755),
            ("file", "data/olddir/x", b"x\n", 0o644),
            ("dir", "data/opq", 0o755),
            ("file", "data/opq/hidden", b"hidden by layer 2\n", 0o644),
        ],
        [
            ("dir", "data", 0o755),
            ("whiteout", "data/gone"),
            ("whiteout", "data/olddir"),
            ("dir", "data/opq", 0o755),
            ("opaque", "data/opq"),
            ("file", "data/opq/new", b"new in layer 2\n", 0o644),
            ("file", "data/payload.bin", _payload(), 0o644),
        ],
        [
            ("dir", "data", 0o755),
            ("file", "data/message", MESSAGE, 0o644),
            ("symlink", "data/link", "payload.bin"),
        ],
    ]


def expected_view(busybox: bytes) -> tuple[dict[str, Any], set[str]]:
    """What the image's root must show (written out by hand from the layers above, not
    computed by our merge): files by sha256, symlinks by target; and names that must be gone."""
    files = {
        "bin/busybox": busybox,
        "etc/motd": MOTD,
        "data/message": MESSAGE,
        "data/opq/new": b"new in layer 2\n",
        "data/payload.bin": _payload(),
    }
    view: dict[str, Any] = {
        name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        for name, data in files.items()
    }
    view.update({f"bin/{a}": {"target": "busybox"} for a in ("sh", "cat", "ls", "md5sum")})
    view["data/link"] = {"target": "payload.bin"}
    return view, {"data/gone", "data/olddir", "data/olddir/x", "data/opq/hidden"}


class Progress:
    """Numbered steps with their time, printed as they finish; timings kept for the report."""

    def __init__(self, out: TextIO, total: int) -> None:
        self.out = out
        self.total = total
        self.n = 0
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def step(self, key: str, text: str) -> Iterator[list[str]]:
        """Run a step; lines appended to the yielded list are printed under its title."""
        self.n += 1
        lines: list[str] = []
        start = time.monotonic()
        print(f"[{self.n}/{self.total}] {text} ...", file=self.out, flush=True)
        yield lines
        self.timings[key] = round(time.monotonic() - start, 3)
        for line in lines:
            print(f"      {line}", file=self.out)
        print(f"      ({self.timings[key]:.2f} s)", file=self.out, flush=True)


def run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise FailedPrecondition(
            "the demo runs containerd, mounts and QEMU: run it as root (make demo)"
        )
    if not BUSYBOX.is_file():
        raise NotFound(f"{BUSYBOX} missing: install busybox-static (.ci/setup does)")
    out = sys.stderr if args.json else sys.stdout
    # containerd's sockets live below the work directory, and unix socket paths end at ~104
    # bytes: a long $TMPDIR falls back to /tmp.
    tmp = tempfile.gettempdir()
    work = Path(tempfile.mkdtemp(prefix="erofs-demo-", dir=tmp if len(tmp) <= 40 else "/tmp"))
    report: dict[str, Any] = {
        "verified_read": False,
        "tamper_detected": False,
        "work_dir": str(work),
    }
    started = time.monotonic()
    progress = Progress(out, STEPS + (args.containerd in ("trixie", "sid")) + args.registry)
    try:
        _demo(work, args.transport, args.containerd, progress, report, args.registry)
    finally:
        report["timings"] = {**progress.timings, "total": round(time.monotonic() - started, 3)}
        if args.keep:
            print(f"work directory kept: {work}", file=out)
        else:
            shutil.rmtree(work, ignore_errors=True)
    ok = report["verified_read"] and report["tamper_detected"]
    print(
        f"verified_read={str(report['verified_read']).lower()} "
        f"tamper_detected={str(report['tamper_detected']).lower()} "
        f"({report['timings']['total']:.1f} s)",
        file=out,
    )
    if args.json:
        print(json.dumps(report, sort_keys=True))
    return 0 if ok else 1


def _containerd(choice: str, progress: Progress):  # -> containerd_private.Dist
    from shim_integration.testbed.containerd_dist import from_suite
    from shim_integration.testbed.containerd_private import system_dist

    if choice == "system":
        return system_dist()
    if choice in ("trixie", "sid"):
        with progress.step(
            "fetch_containerd",
            f"containerd from Debian {choice} "
            "(apt-get download, unpacked into the cache; not installed)",
        ) as say:
            try:
                dist = from_suite(choice)
            except (OSError, subprocess.CalledProcessError) as exc:
                say.append(f"could not fetch it ({exc}); using the machine's containerd")
                return system_dist()
            say.append(f"containerd {dist.version} in {dist.bin_dir}")
            return dist
    return system_dist(Path(choice))


def _publish(
    work: Path,
    archive: Path,
    progress: Progress,
    cleanup: contextlib.ExitStack,
    report: dict[str, Any],
) -> tuple[str, Path]:
    """The publisher's side: a local registry with the image, converted, signed and published
    by a key in its own directory (not the node's work directory, which `serve` and the shim
    see). Returns (the image reference, the publisher's public key)."""
    from shim_integration.publish import publish
    from shim_integration.testbed.local_registry import push_archive, running_registry
    from snapshotter.manifest import generate_key

    with progress.step(
        "publish",
        "local registry; the publisher converts, signs and "
        "publishes the root manifest beside the image",
    ) as say:
        registry = cleanup.enter_context(running_registry(work / "registry"))
        reference = f"{registry.host}/erofs-passthrough/demo:1"
        push_archive(archive, reference, work)
        say.append(f"docker-registry on {registry.host}; skopeo pushed {reference}")
        publisher = Path(tempfile.mkdtemp(prefix="erofs-publisher-"))
        cleanup.callback(shutil.rmtree, publisher, ignore_errors=True)
        key = publisher / "publisher.key"
        kid = generate_key(key)
        say.append(f"publisher key (its own directory, never the node's): ed25519 {kid}")
        published = publish(reference, key, plain_http=True)
        root = published["root_manifest"]
        say.append(f"image {published['image_digest']}")
        say.append(f"signed root manifest pushed as referrer {root['artifact']}")
        public = work / "publisher.pub"  # all the guest is given; the private half stays
        shutil.copyfile(f"{key}.pub", public)
    report["key_id"] = kid
    report["published"] = {
        "reference": reference,
        "image_digest": published["image_digest"],
        "artifact": root["artifact"],
    }
    return reference, public


def _demo(
    work: Path,
    transport: str,
    containerd: str,
    progress: Progress,
    report: dict[str, Any],
    registry: bool = False,
) -> None:
    from passthrough.attach import Attacher
    from passthrough.guest_image import ensure_guest_image
    from passthrough.vm import Vm, VmConfig
    from shim_integration.publish import fetch_manifest
    from shim_integration.shim import Shim, plan_from_fetched, plan_from_mounts
    from shim_integration.testbed.containerd_private import SNAPSHOTTER, Snapshots, Stack
    from shim_integration.testbed.oci_archive import build_image, chain_ids
    from snapshotter.manifest import generate_key

    busybox = BUSYBOX.read_bytes()
    with contextlib.ExitStack() as cleanup:
        with progress.step("build_image", "OCI image: static busybox + data, 3 layers") as say:
            image = build_image(demo_layers(busybox), IMAGE, work / "image.tar", cmd=["/bin/sh"])
            say.append(
                f"{IMAGE}: {(work / 'image.tar').stat().st_size} bytes; layer 2 "
                "whites out data/gone and data/olddir and makes data/opq opaque"
            )
            if not registry:
                key = work / "signing.key"
                kid = generate_key(key)
                say.append(
                    f"node-side signing key for this run (a demo/test shape: keep "
                    f"keys off hosts, see --registry): ed25519 {kid}"
                )
                trusted = Path(f"{key}.pub")
                report["key_id"] = kid
        if registry:
            reference, trusted = _publish(work, work / "image.tar", progress, cleanup, report)

        dist = _containerd(containerd, progress)
        differ = dist.has_diff_proxies
        with progress.step(
            "start_containerd",
            f"private containerd {dist.version} + erofs-passthrough serve "
            f"(VM mode, {'no key' if registry else 'signing key'})",
        ) as say:
            config = work / "serve.toml"
            config.write_text(
                "vm_mode = true\n" if registry else f'vm_mode = true\nsigning_key = "{key}"\n'
            )
            stack = Stack(
                dist, work / "stack", differ=differ, service_args=["--config", str(config)]
            ).start()
            cleanup.callback(stack.stop)
            say.append(
                f"snapshotter {SNAPSHOTTER}"
                + (
                    " and differ"
                    if differ
                    else f" (containerd {dist.version} has no diff proxies: layers are "
                    "converted on Commit)"
                )
            )
        report["containerd"] = {"version": dist.version, "differ": differ}

        verb = "pull --plain-http" if registry else "import"
        with progress.step("import", f"ctr images {verb} --snapshotter {SNAPSHOTTER}") as say:
            if registry:
                stack.containerd.ctr(
                    "images", "pull", "--plain-http", "--snapshotter", SNAPSHOTTER, reference
                )
            else:
                stack.containerd.ctr(
                    "images", "import", "--snapshotter", SNAPSHOTTER, str(work / "image.tar")
                )
            chains = chain_ids(image["diff_ids"])
            layer_roots = []
            for i, chain in enumerate(chains, start=1):
                info = json.loads(
                    stack.containerd.ctr(
                        "snapshots", "--snapshotter", SNAPSHOTTER, "info", chain
                    ).stdout
                )
                labels = info.get("Labels") or {}
                root = labels["containerd.io/snapshot/erofs.verity.root-hash"]
                layer_roots.append(root)
                via = (
                    "our differ"
                    if "containerd.io/snapshot/erofs.diff-id" in labels
                    else "convert on Commit"
                )
                say.append(f"layer {i}: EROFS + dm-verity ({via}), root {root}")

        with progress.step(
            "prepare_rootfs", "container rootfs via containerd's Snapshots API (VM mode)"
        ) as say:
            snapshots = Snapshots(stack.containerd.socket)
            cleanup.callback(snapshots.close)
            mounts = snapshots.prepare(
                ROOTFS_KEY, chains[-1], {"containerd.io/gc.root": time.strftime("%FT%TZ")}
            )
            cleanup.callback(snapshots.remove, ROOTFS_KEY)
            if registry:
                fetched = fetch_manifest(reference, work / "fetched", plain_http=True)
                plan = plan_from_fetched(mounts, work / "fetched", transport)
                say.append(
                    f"the publisher's manifest fetched from the registry (referrer "
                    f"{fetched['artifact']}); its roots are this rootfs's devices"
                )
            else:
                plan = plan_from_mounts(mounts, transport)
            for dev in plan.devices:
                say.append(f"device {dev.position} {dev.role:6} root {dev.root_hash}")
            manifest_digest = "sha256:" + hashlib.sha256(plan.manifest).hexdigest()
            say.append(f"signed manifest {manifest_digest}")
            # The demo's trees are salted (serve's default): options for kata-types only.
            kata = plan.kata_options(kata_types_only=True)
            say.append(
                f"Kata: {len(kata)} io.katacontainers.volume options "
                "(image_raw_block + layer_raw_block; salted trees: kata-types only)"
            )
        if [d.root_hash for d in plan.devices[1:]] != layer_roots:
            raise EpError("the VM-mode devices are not the imported layers")
        report["root_hashes"] = {"fsmeta": plan.devices[0].root_hash, "layers": layer_roots}
        report["manifest_digest"] = manifest_digest

        with progress.step(
            "guest_image", "guest kernel, initramfs, verified root image (vm-images/build, cached)"
        ):
            guest = ensure_guest_image()
        whose = "the publisher's" if registry else "the demo's"
        with progress.step("boot", f"boot the guest under TCG, trusting only {whose} key") as say:
            vm = Vm(
                VmConfig.for_guest(
                    guest, root_ports=8, lockdown=True, trusted_keys=[trusted.read_bytes()]
                )
            )
            cleanup.enter_context(vm)
            agent = vm.wait_agent(timeout=120)
            cleanup.callback(agent.close)
            attacher = cleanup.enter_context(Attacher(vm.qmp))
            shim = Shim(attacher, agent)
            say.append(f"kernel {agent.ping()['kernel']}, root {guest.root_verity['root_hash']}")
            say.append("agent in lockdown (ep.lockdown=1): signed images and what runs in them")

        with progress.step(
            "open_image",
            f"attach {len(plan.devices)} devices ({transport}); "
            "the guest verifies, opens dm-verity, mounts",
        ) as say:
            opened = shim.open(plan, "demo")
            say.append(
                f"guest: signature ok (key {opened.result['key_id']}), "
                f"{len(plan.devices)} root hashes match; manifest "
                f"{opened.manifest_digest}"
            )
            for dev in opened.result["devices"]:
                say.append(f"{dev['disk']} -> {dev['dm']} ({dev['role']})")
            say.append(f"guest timings: {opened.result['timings']}")
        report["guest_manifest_digest"] = opened.manifest_digest
        report["guest_key_id"] = opened.result["key_id"]
        report["node_signing_key"] = not registry

        with progress.step("run", f"in the image's root (chroot): sh -c '{COMMAND}'") as say:
            ran = agent.run("/bin/sh", "-c", COMMAND, image=opened.name)
            say.extend(f"| {line}" for line in (ran["stdout"] + ran["stderr"]).splitlines())
            tree = agent.hash_tree(opened.rootfs)
            want, gone = expected_view(busybox)
            got = {
                n: {k: v for k, v in tree.get(n, {}).items() if k in ("sha256", "size", "target")}
                for n in want
            }
            equal = (
                got == want
                and not (gone & set(tree))
                and not [n for n, e in tree.items() if "errno" in e]
            )
            payload_md5 = hashlib.md5(_payload()).hexdigest()  # what md5sum prints
            verified = (
                ran["rc"] == 0
                and MESSAGE.decode() in ran["stdout"]
                and payload_md5 in ran["stdout"]
                and equal
            )
            say.append(
                f"{len(want)} entries equal to the image's content, "
                f"{len(gone)} whited-out names absent: {'yes' if equal else 'NO'}"
            )
            shim.close(opened)
            say.append("container removed: the guest unmounted, devices detached in reverse")
        report["verified_read"] = verified
        report["command_output"] = ran["stdout"]

        with progress.step(
            "tamper", "a host that lies: swapped layers, a flipped byte, a raw open"
        ) as say:
            report.update(_tamper(work, plan, shim, agent, say))
        report["tamper_detected"] = report["tamper_eio"] or report["tamper_refused"]


def _flip_payload_byte(plan: Any, work: Path) -> tuple[int, Path, int]:
    """Copy the layer blob that holds data/payload.bin and flip one byte of the file's second
    block in the copy; (device position, copy, block number)."""
    needle = _payload()[4096:8192]
    for dev in plan.devices[1:]:
        data = Path(dev.path).read_bytes()
        at = data.find(needle)
        if at >= 0:
            copy = work / f"tampered-layer{dev.position}.erofs"
            shutil.copyfile(dev.path, copy)
            with open(copy, "r+b") as fh:
                fh.seek(at + 100)
                byte = fh.read(1)
                fh.seek(at + 100)
                fh.write(bytes([byte[0] ^ 0x01]))
                fh.flush()
                os.fsync(fh.fileno())
            return dev.position, copy, at // 4096
    raise NotFound("data/payload.bin not found in any layer blob")


def _tamper(work: Path, plan: Any, shim: Any, agent: Any, say: list[str]) -> dict[str, Any]:
    from passthrough.errors import AgentFailure
    from shim_integration.shim import ImageRefused

    result: dict[str, Any] = {"tamper_eio": False, "tamper_refused": False}
    paths = [d.path for d in plan.devices]
    try:
        shim.open(plan.with_paths([paths[0], paths[2], paths[1], *paths[3:]]), "swapped")
        say.append("swapped layer devices: OPENED (this must not happen)")
        result["swap_refused"] = None
    except ImageRefused as exc:
        say.append(f"swapped layer devices: refused, nothing opened: {exc.reason}")
        result["swap_refused"] = exc.reason

    position, copy, block = _flip_payload_byte(plan, work)
    say.append(
        f"flipped one byte of data/payload.bin in a copy of layer {position}'s blob (block {block})"
    )
    tampered = plan.with_paths([str(copy) if i == position else p for i, p in enumerate(paths)])
    try:
        opened = shim.open(tampered, "tampered")
    except ImageRefused as exc:
        say.append(f"refused: {exc.reason}")
        result["tamper_refused"] = exc.reason
        return result
    try:
        ran = agent.run(
            "/bin/sh", "-c", "md5sum /data/payload.bin; cat /data/message", image=opened.name
        )
        say.extend(f"| {line}" for line in (ran["stdout"] + ran["stderr"]).splitlines())
        try:
            agent.read_file(f"{opened.rootfs}/data/payload.bin")
            say.append("data/payload.bin read WITHOUT error (this must not happen)")
        except AgentFailure as exc:
            result["tamper_errno"] = exc.errno
            result["tamper_eio"] = exc.errno == 5 and MESSAGE.decode() in ran["stdout"]
            say.append(f"data/payload.bin: errno {exc.errno} (EIO), the other files read fine")
        status = agent.verity_status(f"tampered-{position}")
        say.append(f"dm-verity device tampered-{position}: corrupted={status['corrupted']}")
        disk = opened.result["devices"][position]["disk"]
        try:
            # a well-formed request for a tree the manifest never signed
            bypass = VerityInfo(
                root_hash="00" * 32,
                salt="",
                hash_name="sha256",
                data_block_size=4096,
                hash_block_size=4096,
                data_blocks=1,
                hash_offset=4096,
                superblock=False,
                uuid=None,
            )
            agent.call("verity_open", name="bypass", table=bypass.table_line(disk, disk))
            say.append("raw verity_open of the disk: ACCEPTED (this must not happen)")
            result["bypass_refused"] = None
        except Refused as exc:
            say.append(f"raw verity_open of {disk} without the manifest: {exc}")
            result["bypass_refused"] = str(exc)
    finally:
        shim.close(opened)
    return result
