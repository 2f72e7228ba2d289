"""serve's `mount_style = "containerd-2.3"`: a snapshot's mounts are exactly what containerd
main's erofs snapshotter returns, read from its source, and they mount with the host kernel
the way containerd's mount manager mounts them (each layer checked against its sidecar with
veritysetup, then overlay over the layers); "classic" stays as it was."""

from __future__ import annotations

import contextlib
import re
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapshotter.errors import InvalidArgument
from snapshotter.service import layer_build
from snapshotter.service.mounts import Mount
from snapshotter.service.serve_config import ConfigError, load_config
from snapshotter.service.snapshots import Snapshotter
from tests.support.helpers import require_root, require_tool
from tests.support.verity import veritysetup_verify


def containerd_main_mounts(
    kind: str, own_blob: str | None, parent_blobs: list[str], upper: str, work: str
) -> list[Mount]:
    """containerd main (301026e, Aug 2026) `plugins/snapshots/erofs/erofs.go`, `(*snapshotter)
    mounts` with `createErofsMount` and `applyDmverityPolicy` (dmverity_mode "auto", every blob
    having its `.dmverity`), in its non-block mode, without a merged fsmeta (`mountFsMeta`
    finds no fsmeta.erofs in a parent's directory), no remapped ids and no `ovl_mount_options`.
    PARENT_BLOBS nearest first (containerd's ParentIDs order)."""

    def erofs(blob: str) -> Mount:
        return Mount("erofs", blob, ["ro", "loop", f"X-containerd.dmverity={blob}.dmverity"])

    if not parent_blobs:
        if own_blob is not None:  # `lowerPath(snap.ID)` found the snapshot's own blob
            return [erofs(own_blob)]
        return [Mount("bind", upper, ["ro" if kind == "view" else "rw", "rbind"])]
    options: list[str] = []
    if kind == "active":
        options += [f"workdir={work}", f"upperdir={upper}"]
    elif len(parent_blobs) == 1:
        return [erofs(parent_blobs[0])]
    mounts = [erofs(blob) for blob in parent_blobs]
    first = 0
    if len(mounts) - first == 1:  # a view of one lower has returned above
        options.append(f"lowerdir={{{{ mount {first} }}}}")
    else:
        options.append(f"lowerdir={{{{ overlay {first} {len(mounts) - 1} }}}}")
    return [*mounts, Mount("format/mkdir/overlay", "overlay", options)]


@pytest.fixture
def sn(tmp_path: Path) -> Iterator[Snapshotter]:
    require_root()  # an active snapshot over a parent takes its root's owner from a mount
    require_tool("veritysetup")
    s = Snapshotter(tmp_path / "root", mount_style="containerd-2.3")
    yield s
    s.close()
    from shim_integration.testbed.containerd_private import unmount_under

    unmount_under(tmp_path)


def _upper(mounts: list[Mount]) -> Path:
    last = mounts[-1]
    if last.type == "bind":
        return Path(last.source)
    return Path(
        next(o for o in last.options if o.startswith("upperdir=")).removeprefix("upperdir=")
    )


def _chain(sn: Snapshotter, n: int) -> list[str]:
    """N committed layers, each on the previous one; layer i has `layer` = i and its own file."""
    parent = ""
    names = []
    for i in range(n):
        mounts = sn.prepare(f"ns/{i}/extract", parent)
        upper = _upper(mounts)
        (upper / "layer").write_text(f"{i}\n")
        (upper / f"only-{i}").write_text(f"from layer {i}\n")
        parent = f"ns/{i}/layer"
        sn.commit(parent, f"ns/{i}/extract")
        names.append(parent)
    return names


def _blob(sn: Snapshotter, key: str) -> str:
    return str(sn.layout.layer(sn.store.get_info(key)[0]))


def _paths(sn: Snapshotter, key: str) -> tuple[str, str]:
    sid = sn.store.get_info(key)[0]
    return str(sn.layout.fs(sid)), str(sn.layout.work(sid))


@pytest.mark.parametrize("parents", [0, 1, 3])
@pytest.mark.parametrize("kind", ["active", "view"])
def test_mounts_are_containerd_mains_shape(sn: Snapshotter, parents: int, kind: str) -> None:
    chain = _chain(sn, parents)
    parent = chain[-1] if chain else ""
    create = sn.prepare if kind == "active" else sn.view
    got = create(f"ns/x/{kind}", parent)
    blobs = [_blob(sn, key) for key in reversed(chain)]  # nearest parent first
    want = containerd_main_mounts(kind, None, blobs, *_paths(sn, f"ns/x/{kind}"))
    assert got == want
    assert sn.mounts(f"ns/x/{kind}") == want
    for m in got:  # every X-containerd.dmverity names a sidecar that verifies its blob
        for option in m.options:
            if option.startswith("X-containerd.dmverity="):
                sidecar = Path(option.removeprefix("X-containerd.dmverity="))
                assert veritysetup_verify(Path(m.source), sidecar=sidecar).returncode == 0


def test_a_parentless_snapshot_with_its_own_layer_mounts_that_layer(sn: Snapshotter) -> None:
    """After our differ applied a layer into a parentless active snapshot (before Commit),
    containerd's snapshotter returns that blob's erofs mount, and so do we."""
    mounts = sn.prepare("ns/1/extract")
    fs = Path(mounts[0].source)
    (fs / "f").write_text("applied\n")
    directory = fs.parent
    layer_build.publish_layer(directory, lambda out: layer_build.convert_directory(fs, out))
    want = containerd_main_mounts("active", str(directory / "layer.erofs"), [], str(fs), "")
    assert sn.mounts("ns/1/extract") == want


def test_differ_still_recognises_containerd_2_3_active_mounts(sn: Snapshotter) -> None:
    """Our differ finds its snapshot in the containerd-2.3 shape too (erofs lowers, then the
    format/mkdir/overlay with upperdir), not only in a single bind or overlay mount."""
    from snapshotter.service.diff_service import upper_dir

    chain = _chain(sn, 2)
    mounts = sn.prepare("ns/x/extract", chain[-1])
    assert upper_dir(mounts) == Path(_paths(sn, "ns/x/extract")[0])
    assert upper_dir(mounts[:-1]) is None  # erofs lowers alone are no snapshot of ours


@contextlib.contextmanager
def mount_like_containerd(mounts: list[Mount], target: Path) -> Iterator[Path]:
    """Mount MOUNTS on TARGET as containerd's mount manager does (`core/mount/manager`): each
    mount in order on a directory of its own, then the last one with its `{{ mount i }}` /
    `{{ overlay i j }}` templates replaced by those directories (`format.go`), the `format/`
    and `mkdir/` prefixes being the manager's. containerd's erofs mount handler opens a
    dm-verity device from each `X-containerd.dmverity` sidecar; this host's kernel has no
    device-mapper, so the sidecar's values are checked with `veritysetup verify` (the same
    superblock-mode read) and the layer is mounted over loop."""
    with contextlib.ExitStack() as stack:
        points: list[str] = []
        for m in mounts[:-1]:
            assert m.type == "erofs" and m.options[:2] == ["ro", "loop"]
            [option] = [o for o in m.options if o.startswith("X-containerd.dmverity=")]
            proc = veritysetup_verify(Path(m.source), sidecar=Path(option.split("=", 1)[1]))
            assert proc.returncode == 0, proc.stderr
            point = Path(tempfile.mkdtemp(prefix="ep-lower-"))
            stack.callback(point.rmdir)
            subprocess.run(
                ["mount", "-t", "erofs", "-o", "ro,loop", m.source, str(point)],
                check=True,
                capture_output=True,
                timeout=60,
            )
            stack.callback(subprocess.run, ["umount", str(point)], check=True)
            points.append(str(point))
        last = mounts[-1]

        def fill(option: str) -> str:
            option = re.sub(r"\{\{ mount (\d+) \}\}", lambda g: points[int(g[1])], option)
            return re.sub(
                r"\{\{ overlay (\d+) (\d+) \}\}",
                lambda g: ":".join(points[int(g[1]) : int(g[2]) + 1]),
                option,
            )

        kind = last.type.removeprefix("format/").removeprefix("mkdir/")
        subprocess.run(
            [
                "mount",
                "-t",
                kind,
                "-o",
                ",".join(map(fill, last.options)),
                last.source,
                str(target),
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        stack.callback(subprocess.run, ["umount", str(target)], check=True)
        yield target


@pytest.mark.parametrize("kind", ["active", "view"])
def test_containerd_2_3_mounts_mount_with_the_host_kernel(
    sn: Snapshotter, tmp_path: Path, kind: str
) -> None:
    """The host kernel mounts the list: the nearest layer wins, every layer's own file is
    there, and an active snapshot's writes land in its upperdir."""
    chain = _chain(sn, 3)
    create = sn.prepare if kind == "active" else sn.view
    mounts = create(f"ns/x/{kind}", chain[-1])
    target = tmp_path / f"rootfs-{kind}"
    target.mkdir()
    with mount_like_containerd(mounts, target) as rootfs:
        assert (rootfs / "layer").read_text() == "2\n"
        assert [(rootfs / f"only-{i}").read_text() for i in range(3)] == [
            f"from layer {i}\n" for i in range(3)
        ]
        if kind == "active":
            (rootfs / "new").write_text("written\n")
    if kind == "active":
        assert (Path(_paths(sn, "ns/x/active")[0]) / "new").read_text() == "written\n"


def test_mount_style_is_checked() -> None:
    """A misspelt style is one clear line at start, in the config file or the Snapshotter."""
    with pytest.raises(ConfigError) as err:
        load_config(None, mount_style="containerd-2.2")
    assert str(err.value) == (
        'option: --mount-style must be one of classic, containerd-2.3, got string "containerd-2.2"'
    )
    assert load_config(None).mount_style == "classic"
    with pytest.raises(InvalidArgument, match="mount style 'overlay' is not one of"):
        Snapshotter(Path("/nonexistent/ep-style"), mount_style="overlay")


def test_classic_is_the_default_and_unchanged(tmp_path: Path) -> None:
    require_root()
    s = Snapshotter(tmp_path / "root")
    try:
        chain = _chain(s, 1)
        [m] = s.view("ns/x/view", chain[-1])
        assert m == Mount("erofs", _blob(s, chain[-1]), ["ro", "loop"])
        [m] = s.prepare("ns/x/active", chain[-1])
        assert m.type == "overlay" and not any("X-containerd" in o for o in m.options)
    finally:
        s.close()
        from shim_integration.testbed.containerd_private import unmount_under

        unmount_under(tmp_path)


def test_serve_config_key_reaches_the_snapshots_service(tmp_path: Path) -> None:
    """`mount_style = "containerd-2.3"` in serve's TOML file: what containerd gets over gRPC
    from Prepare, View and Mounts is that shape."""
    import grpc

    from shim_integration.testbed.containerd_private import SnapshotterProcess, unmount_under
    from snapshotter.service.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
    from snapshotter.service.api.containerd.services.snapshots.v1 import (
        snapshots_pb2_grpc as pb_grpc,
    )

    require_root()
    config = tmp_path / "serve.toml"
    config.write_text('mount_style = "containerd-2.3"\n')
    sock = tmp_path / "sn.sock"
    service = SnapshotterProcess(
        tmp_path / "root", sock, tmp_path / "sn.log", extra=["--config", str(config)]
    )
    header = (("containerd-namespace", "default"),)

    def mounts_of(reply: object) -> list[Mount]:
        return [Mount(m.type, m.source, list(m.options), m.target) for m in reply.mounts]  # type: ignore[attr-defined]

    try:
        service.start()
        with grpc.insecure_channel(f"unix:{sock}") as channel:
            stub = pb_grpc.SnapshotsStub(channel)
            [bind] = mounts_of(
                stub.Prepare(
                    pb.PrepareSnapshotRequest(key="default/1/x"), metadata=header, timeout=60
                )
            )
            assert bind.type == "bind" and bind.options == ["rw", "rbind"]
            Path(bind.source, "f").write_text("served\n")
            stub.Commit(
                pb.CommitSnapshotRequest(key="default/1/x", name="default/1/L"),
                metadata=header,
                timeout=60,
            )
            blob = str(Path(bind.source).parent / "layer.erofs")
            view = mounts_of(
                stub.View(
                    pb.ViewSnapshotRequest(key="default/2/v", parent="default/1/L"),
                    metadata=header,
                    timeout=60,
                )
            )
            assert view == containerd_main_mounts("view", None, [blob], "", "")
            active = mounts_of(
                stub.Prepare(
                    pb.PrepareSnapshotRequest(key="default/3/a", parent="default/1/L"),
                    metadata=header,
                    timeout=60,
                )
            )
            upper = Path(
                next(o for o in active[-1].options if o.startswith("upperdir=")).removeprefix(
                    "upperdir="
                )
            )
            assert active == containerd_main_mounts(
                "active", None, [blob], str(upper), str(upper.parent / "work")
            )
            assert (
                mounts_of(
                    stub.Mounts(pb.MountsRequest(key="default/3/a"), metadata=header, timeout=60)
                )
                == active
            )
    finally:
        if service.proc is not None and service.proc.poll() is None:
            service.stop()
        unmount_under(tmp_path)


def test_a_layer_without_sidecar_gets_it_when_a_list_names_it(sn: Snapshotter) -> None:
    """A layer committed before sidecars were written: the first containerd-2.3 list naming it
    writes the sidecar (from layer.json), so the option never names a missing file."""
    [key] = _chain(sn, 1)
    sidecar = Path(_blob(sn, key) + ".dmverity")
    written = sidecar.read_bytes()
    sidecar.unlink()
    [m] = sn.view("ns/x/view", key)
    assert m.options[2] == f"X-containerd.dmverity={sidecar}"
    assert sidecar.read_bytes() == written


@pytest.mark.containerd
@pytest.mark.parametrize("setup", ["1.6", "2.1+differ"])
def test_containerd_before_2_2_cannot_mount_the_containerd_2_3_list(
    tmp_path: Path, setup: str
) -> None:
    """Why "classic" stays the default (docs/containerd.md, "Which to pick"): a real containerd
    1.6 or 2.1 hands the containerd-2.3 list to mount(2), which refuses the erofs mount's
    `X-containerd.dmverity` option (EINVAL). 1.6 (walking differ) cannot even unpack the
    second layer; 2.1 unpacks through our differ (which finds the list's upperdir) but cannot
    mount the container's rootfs."""
    import shutil as _shutil

    from shim_integration.testbed.containerd_dist import from_suite
    from shim_integration.testbed.containerd_private import Stack, system_dist
    from shim_integration.testbed.oci_archive import build_image

    require_root()
    require_tool("containerd")
    busybox = Path(require_tool("busybox")).read_bytes()
    config = tmp_path / "serve.toml"
    config.write_text('mount_style = "containerd-2.3"\n')
    version, _, differ = setup.partition("+")
    dist = system_dist() if version == "1.6" else from_suite("sid")
    base = Path(tempfile.mkdtemp(prefix="ctd-style-"))
    stack = Stack(dist, base, differ=bool(differ), service_args=["--config", str(config)])
    layers = [
        [("dir", "bin", 0o755), ("file", "bin/busybox", busybox, 0o755)],
        [("file", "hello", b"two layers\n", 0o644)],
    ]
    try:
        stack.start()
        build_image(layers, "example.com/erofs-py/style:1", base / "image.tar")
        ctr = stack.containerd.ctr
        imported = ctr(
            "images", "import", "--snapshotter", "erofs-py", str(base / "image.tar"), check=False
        )
        if version == "1.6":
            assert imported.returncode != 0
            assert "failed to mount" in imported.stderr, imported.stderr
            assert "invalid argument" in imported.stderr, imported.stderr
            return
        assert imported.returncode == 0, imported.stderr
        run = ctr(
            "run",
            "--rm",
            "--snapshotter",
            "erofs-py",
            "example.com/erofs-py/style:1",
            "style",
            "/bin/busybox",
            "cat",
            "/hello",
            check=False,
        )
        assert run.returncode != 0 and "two layers" not in run.stdout
        assert 'data: "X-containerd.dmverity=' in run.stderr, run.stderr
        assert run.stderr.rstrip().endswith("err: invalid argument"), run.stderr
    finally:
        stack.stop()
        _shutil.rmtree(base, ignore_errors=True)
