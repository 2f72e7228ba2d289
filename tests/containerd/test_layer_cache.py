"""The layer cache keyed by diffID (serve's `layer_caches`, containerd's
`layer_content_caches` layout), filled by `publish --out-cache` from Debian's docker-registry,
read by our differ under a private containerd 1.7 / 2.1.

A hit must be a layer the kernel mounts with the publisher's roots and the same tree, with the
layer blob never read from containerd's content store (it is deleted from the store's disk
before the unpack) and no conversion logged; a corrupt entry is refused with a warning and its
layer converted; a miss converts.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from shim_integration.testbed.containerd_private import Stack
from shim_integration.testbed.oci_archive import build_image, chain_ids, layer_tar
from snapshotter.service.layer_cache import CacheEntryError, LayerCache, blob_path, chain_id
from snapshotter.service.serve_config import load_config
from snapshotter.verity import KATA_VERITY
from snapshotter.verity.files import format_file
from tests.support.cli import TIMEOUT, ok_json, run_cli
from tests.support.containerd import LIST_SCRIPT, OURS, THEIRS, VERSIONS, image_layers
from tests.support.erofs_utils_oracle import OracleUnavailable, erofs_utils
from tests.support.helpers import assert_one_line_error, mounted_erofs, require_root, require_tool
from tests.support.registry import push_image, running_registry

IMAGE = "example.com/erofs-py/cached:1"
BLOCK = 4096


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Iterator[dict]:
    """A 3-layer image pushed to a registry and published with --out-cache; its archive."""
    tmp = tmp_path_factory.mktemp("layercache")
    archive = tmp / "image.tar"
    info = build_image(image_layers(), IMAGE, archive)
    with running_registry(tmp) as registry:
        push_image(archive, f"{registry.host}/demo/cached:1", tmp)
        key = tmp / "publisher.key"
        ok_json("key", "generate", key)
        cache = tmp / "cache"
        report = ok_json(
            "publish",
            f"{registry.host}/demo/cached:1",
            "--key",
            key,
            "--plain-http",
            "--out-cache",
            cache,
        )
        yield {
            "tmp": tmp,
            "archive": archive,
            "info": info,
            "cache": cache,
            "report": report,
            "registry": registry,
            "key": key,
        }


def test_publish_fills_containerds_layout_that_veritysetup_verifies(published):
    cache, report = published["cache"], published["report"]
    diff_ids = published["info"]["diff_ids"]
    assert [e["diff_id"] for e in report["cache"]] == diff_ids
    signed_roots = report["devices"]["layers"]
    veritysetup = require_tool("veritysetup")
    for diff_id, root in zip(diff_ids, signed_roots, strict=True):
        hexdigest = diff_id.removeprefix("sha256:")
        blob = cache / "sha256" / hexdigest[:2] / f"{hexdigest}.erofs"
        assert blob.is_file()
        sidecar = json.loads(Path(f"{blob}.dmverity").read_text())
        assert sidecar["roothash"] == root  # the root the signed manifest names
        proc = subprocess.run(
            [
                veritysetup,
                "verify",
                str(blob),
                str(blob),
                root,
                f"--hash-offset={sidecar['hashoffset']}",
            ],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr
    assert not list(cache.rglob(".*"))  # no temp files left


def test_unwritable_cache_fails_publish_in_one_line_before_any_push(published, tmp_path):
    image = f"{published['registry'].host}/demo/cached:1"
    newest = ok_json("manifest", "fetch", image, "--out", tmp_path / "before", "--plain-http")
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("x")
    proc = run_cli(
        "publish",
        image,
        "--key",
        published["key"],
        "--plain-http",
        "--out-cache",
        not_a_directory,
        check=False,
        timeout=TIMEOUT,
    )
    assert_one_line_error(proc, "layer cache", str(not_a_directory))
    assert not_a_directory.read_text() == "x"
    after = ok_json("manifest", "fetch", image, "--out", tmp_path / "after", "--plain-http")
    assert after["artifact"] == newest["artifact"]  # nothing was pushed


def test_stage_gives_the_publishers_layer(published, tmp_path):
    diff_id = published["info"]["diff_ids"][1]
    cache = LayerCache([tmp_path / "absent", published["cache"]])
    blob = cache.find(diff_id)
    assert blob == blob_path(published["cache"], diff_id)
    out = tmp_path / "layer.erofs"
    out.touch()
    meta = cache.stage(blob, out, diff_id, True)
    assert out.read_bytes() == blob.read_bytes()
    assert meta.root_hash == published["report"]["devices"]["layers"][1]
    assert meta.diff_id == diff_id and cache.hits == 1


def test_diff_id_from_containerds_names_and_labels(published):
    diff_ids = published["info"]["diff_ids"]
    chain = chain_ids(diff_ids)
    cache = LayerCache([published["cache"]])
    assert chain_id(chain[0], diff_ids[1]) == chain[1]
    # ctr import/run: no labels; the key's last word is the chain ID, the parent is named by
    # its chain ID (keys as containerd's metadata layer passes them).
    for i in range(3):
        parent = f"default/{i + 3}/{chain[i - 1]}" if i else ""
        key = f"default/{i + 7}/extract-123-abc {chain[i]}"
        assert cache.diff_id_of(key, {}, parent) == diff_ids[i]
    # a pull's unpacker: the snapshot.ref label; containerd 2.3+: the diff-id label
    assert (
        cache.diff_id_of(
            "default/9/k", {"containerd.io/snapshot.ref": chain[2]}, f"default/8/{chain[1]}"
        )
        == diff_ids[2]
    )
    assert (
        cache.diff_id_of(
            "default/9/k", {"containerd.io/snapshot/diff-id": diff_ids[0]}, "default/8/whatever"
        )
        == diff_ids[0]
    )
    # a diff-id label that contradicts the chain ID is not believed
    key = f"default/9/extract-1 {chain[1]}"
    assert (
        cache.diff_id_of(
            key, {"containerd.io/snapshot/diff-id": diff_ids[1]}, f"default/8/{chain[0]}"
        )
        == diff_ids[1]
    )
    assert (
        cache.diff_id_of(
            key, {"containerd.io/snapshot/diff-id": diff_ids[2]}, f"default/8/{chain[0]}"
        )
        is None
    )
    # not an extraction, or a layer not in the cache: unknown
    assert cache.diff_id_of("default/9/rootfs", {}, f"default/8/{chain[2]}") is None
    other = "sha256:" + "ab" * 32
    assert cache.diff_id_of(f"default/9/extract-1 {other}", {}, f"default/8/{chain[2]}") is None


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def _not_erofs(blob: Path) -> None:
    """Replace BLOB by zeros with a valid verity tree and sidecar: verity cannot tell."""
    data = blob.parent / "zeros"
    data.write_bytes(bytes(8 * BLOCK))
    info = format_file(data)
    data.rename(blob)
    Path(f"{blob}.dmverity").write_text(
        json.dumps({"roothash": info.root_hash, "hashoffset": info.hash_offset})
    )


def _sidecar(blob: Path, **changes: object) -> None:
    side = Path(f"{blob}.dmverity")
    side.write_text(json.dumps({**json.loads(side.read_text()), **changes}))


CORRUPTIONS = {
    "data byte": (lambda b: _flip(b, 1500), "data block 0 (bytes 0..4095"),
    "tree byte": (
        lambda b: _flip(
            b, json.loads(Path(f"{b}.dmverity").read_text())["hashoffset"] + BLOCK + 10
        ),
        "does not match the root hash",
    ),
    "root hash": (lambda b: _sidecar(b, roothash="00" * 32), "does not match the root hash"),
    "hash offset": (lambda b: _sidecar(b, hashoffset=BLOCK), "no verity superblock"),
    "sidecar not json": (lambda b: Path(f"{b}.dmverity").write_text("{"), "not JSON"),
    "sidecar missing": (lambda b: Path(f"{b}.dmverity").unlink(), "cannot read"),
    "truncated": (lambda b: b.write_bytes(b.read_bytes()[: BLOCK * 3]), "no verity superblock"),
    "not erofs": (_not_erofs, "not an EROFS image"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_entry_is_refused(published, tmp_path, case):
    damage, expected = CORRUPTIONS[case]
    diff_id = published["info"]["diff_ids"][0]
    cache_dir = tmp_path / "cache"
    shutil.copytree(published["cache"], cache_dir)
    blob = blob_path(cache_dir, diff_id)
    damage(blob)
    cache = LayerCache([cache_dir])
    out = tmp_path / "layer.erofs"
    out.touch()
    with pytest.raises(CacheEntryError) as exc:
        cache.stage(blob, out, diff_id, True)
    assert expected in str(exc.value) and "\n" not in str(exc.value)
    assert cache.hits == 0


def test_entry_bigger_than_the_image_ceiling_is_refused(published, tmp_path):
    diff_id = published["info"]["diff_ids"][0]
    cache = LayerCache([published["cache"]])
    out = tmp_path / "layer.erofs"
    out.touch()
    with pytest.raises(CacheEntryError, match="more than the 4096 bytes a layer may have"):
        cache.stage(cache.find(diff_id), out, diff_id, True, max_image_bytes=BLOCK)
    assert out.stat().st_size == 0  # refused before anything was copied


def test_salted_entry_refused_by_a_kata_verity_node(published, tmp_path):
    diff_id = published["info"]["diff_ids"][0]
    cache = LayerCache([published["cache"]])
    out = tmp_path / "layer.erofs"
    out.touch()
    with pytest.raises(CacheEntryError, match="unsalted"):
        cache.stage(cache.find(diff_id), out, diff_id, KATA_VERITY)


# -- through containerd ----------------------------------------------------------------------


def _log_records(stack: Stack) -> list[dict]:
    records = []
    for line in stack.service.log.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _messages(stack: Stack, message: str) -> list[dict]:
    return [r for r in _log_records(stack) if r.get("msg", r.get("message")) == message]


@pytest.fixture(params=["1.7", "2.1"])
def cached_stack(request, published) -> Iterator[tuple[Stack, Path]]:
    """A containerd VERSION with our snapshotter and differ, `serve` reading a copy of the
    published cache (after a cache directory that does not exist: a miss, not an error)."""
    require_root()
    dist = VERSIONS[request.param]()
    base = Path(tempfile.mkdtemp(prefix=f"ctd-cache-{dist.version}-"))
    cache = base / "cache"
    shutil.copytree(published["cache"], cache)
    config = base / "serve.toml"
    config.write_text(f'layer_caches = ["{base}/no-such-cache", "{cache}"]\n')
    stack = Stack(dist, base, differ=True, service_args=["--config", str(config)]).start()
    yield stack, cache
    stack.stop()
    shutil.rmtree(base, ignore_errors=True)


def _import_without_layer_blobs(stack: Stack, archive: Path, layer_digests: list[str]) -> None:
    """Import the image with no unpack, then delete its layer blobs from the content store's
    disk: any read of one by the differ fails."""
    ctr = stack.containerd.ctr
    ctr("images", "import", "--no-unpack", str(archive))
    blobs = stack.containerd.base / "root" / "io.containerd.content.v1.content" / "blobs"
    for digest in layer_digests:
        path = blobs / "sha256" / digest.removeprefix("sha256:")
        assert path.is_file(), path
        path.unlink()


def _view(stack: Stack, snapshotter: str, name: str) -> str:
    listing = stack.containerd.run_output(snapshotter, IMAGE, name, LIST_SCRIPT)
    assert "/data" in listing, listing  # a listing, not an empty output on both sides
    return listing


def test_containerd_unpack_hits_without_reading_the_content_store(cached_stack, published):
    stack, _ = cached_stack
    info = published["info"]
    # containerd's own view of the image, for comparison, before the blobs go
    stack.containerd.ctr("images", "import", "--snapshotter", THEIRS, str(published["archive"]))
    expected = _view(stack, THEIRS, "theirs")
    stack.containerd.ctr("images", "rm", IMAGE)
    _import_without_layer_blobs(stack, published["archive"], info["layer_digests"])
    assert _view(stack, OURS, "ours") == expected
    hits = _messages(stack, "layer from cache")
    assert [h["diff_id"] for h in hits] == info["diff_ids"]
    assert _messages(stack, "converting layer") == []
    assert _messages(stack, "layer cache entry refused, converting the layer") == []
    signed = published["report"]["devices"]["layers"]
    for chain, root in zip(chain_ids(info["diff_ids"]), signed, strict=True):
        labels = json.loads(
            stack.containerd.ctr("snapshots", "--snapshotter", OURS, "info", chain).stdout
        )["Labels"]
        assert labels["containerd.io/snapshot/erofs.verity.root-hash"] == root


def test_containerd_corrupt_entry_and_miss_convert(cached_stack, published):
    stack, cache = cached_stack
    info = published["info"]
    _flip(blob_path(cache, info["diff_ids"][1]), 100)  # layer 2: corrupt
    blob_path(cache, info["diff_ids"][2]).unlink()  # layer 3: a miss
    stack.containerd.ctr("images", "import", "--snapshotter", THEIRS, str(published["archive"]))
    expected = _view(stack, THEIRS, "theirs")
    stack.containerd.ctr("images", "rm", IMAGE)
    stack.containerd.ctr("images", "import", "--snapshotter", OURS, str(published["archive"]))
    assert _view(stack, OURS, "ours") == expected
    # 2.1's import unpacks through the unpacker, so its hit is taken at Prepare
    hits = _messages(stack, "layer from cache") + _messages(stack, "layer from cache at prepare")
    assert [h["diff_id"] for h in hits] == info["diff_ids"][:1]
    refused = _messages(stack, "layer cache entry refused, converting the layer")
    assert [r["diff_id"] for r in refused] == [info["diff_ids"][1]]
    assert refused[0]["level"].lower().startswith("warn")
    assert "does not match its hash" in refused[0]["reason"]
    converted = _messages(stack, "converting layer")
    assert [c["digest"] for c in converted] == info["layer_digests"][1:]


def test_entry_built_as_containerds_build_erofs_cache_is_used(published, tmp_path):
    """An entry made the way `ctr images build-erofs-cache --dmverity` makes one (mkfs.erofs
    --tar=f --aufs -Enoinline_data, then a tree with containerd's defaults: superblock at the
    blob's end, 32 zero bytes of salt, sidecar {roothash, hashoffset}) passes our checks, and
    the kernel mounts the staged copy with the layer's files."""
    try:
        mkfs = erofs_utils().mkfs  # containerd needs mkfs.erofs >= 1.8 for --tar=f
    except OracleUnavailable as exc:
        pytest.skip(f"no erofs-utils 1.8: {exc}")
    veritysetup = require_tool("veritysetup")
    tar = layer_tar(image_layers()[0])
    diff_id = "sha256:" + hashlib.sha256(tar).hexdigest()
    blob = blob_path(tmp_path / "cache", diff_id)
    blob.parent.mkdir(parents=True)
    layer = tmp_path / "layer.tar"
    layer.write_bytes(tar)
    subprocess.run(
        [mkfs, "--tar=f", "--aufs", "--quiet", "-Enoinline_data", str(blob), str(layer)],
        check=True,
        capture_output=True,
    )
    hash_offset = blob.stat().st_size
    assert hash_offset % BLOCK == 0
    proc = subprocess.run(
        [
            veritysetup,
            "format",
            str(blob),
            str(blob),
            f"--hash-offset={hash_offset}",
            f"--data-blocks={hash_offset // BLOCK}",
            "--salt=" + "00" * 32,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    root = re.search(r"Root hash:\s+([0-9a-f]{64})", proc.stdout).group(1)
    Path(f"{blob}.dmverity").write_text(
        json.dumps({"roothash": root, "hashoffset": hash_offset}, indent=2)
    )
    out = tmp_path / "layer.erofs"
    out.touch()
    meta = LayerCache([tmp_path / "cache"]).stage(blob, out, diff_id, True)
    assert (meta.root_hash, meta.salt, meta.hash_offset) == (root, "00" * 32, hash_offset)
    with mounted_erofs(out) as mnt:
        assert (mnt / "bin/busybox").read_bytes() == Path(require_tool("busybox")).read_bytes()
        assert (mnt / "data/olddir/x").read_bytes() == b"x\n"


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        (
            'layer_caches = "/var/cache"',
            "key 'layer_caches' must be an array of absolute paths, got string \"/var/cache\"",
        ),
        (
            'layer_caches = ["/ok", "relative"]',
            "key 'layer_caches' item 2 must be an absolute path, got string \"relative\"",
        ),
        (
            "layer_caches = [3]",
            "key 'layer_caches' item 1 must be a non-empty path string, got integer 3",
        ),
    ],
)
def test_bad_layer_caches_setting_is_one_line(tmp_path, toml, expected):
    config = tmp_path / "serve.toml"
    config.write_text(toml + "\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "snapshotter.service.cli",
            "serve",
            "--config",
            str(config),
            "--root",
            str(tmp_path / "root"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"erofs-passthrough serve: config {config}: {expected}"]
    assert not (tmp_path / "root").exists()


def test_layer_caches_setting_loads_in_order(tmp_path):
    config = tmp_path / "serve.toml"
    config.write_text(f'layer_caches = ["{tmp_path}/a", "{tmp_path}/b"]\n')
    loaded = load_config(config)
    assert loaded.layer_caches == [tmp_path / "a", tmp_path / "b"]
    assert load_config(None).layer_caches == []


# -- a hit at Prepare: containerd fetches nothing ----------------------------------------------
#
# Only 2.1: these pulls need containerd's unpacker (pkg/unpack, core/unpack in 2.x), which a
# `ctr images pull` reaches only through the transfer service. 1.7's ctr has two pulls and
# neither can serve here: its default (`--local`) runs content.Fetch, which downloads every blob,
# and only then image.Unpack (rootfs.ApplyLayers: no snapshot.ref label, so nothing to skip);
# its transfer pull builds `registry.NewOCIRegistry(ref, nil, creds)` with no plain-HTTP or
# hosts option (cmd/ctr/commands/images/pull.go, v1.7.24), so it cannot reach a local
# plain-HTTP registry. 1.7's unpacker itself (client.Pull with WithPullUnpack, as the CRI
# plugin pulls) has the same Prepare/AlreadyExists and lazy fetch code as 2.1's.
PULL_VERSIONS = ["2.1"]


def _pull(stack: Stack, reference: str) -> list[str]:
    """Pull REFERENCE through the unpacker (`--local=false`: the transfer service, whose
    unpacker labels each extraction `containerd.io/snapshot.ref`; 1.7's default local pull
    fetches every blob before it unpacks); the image manifest's layer digests."""
    ctr = stack.containerd.ctr
    ctr("images", "pull", "--local=false", "--plain-http", "--snapshotter", OURS, reference)
    listed = ctr("images", "ls").stdout.splitlines()
    target = next(line.split()[2] for line in listed if line.split()[0] == reference)
    manifest = json.loads(ctr("content", "get", target).stdout)
    return [layer["digest"] for layer in manifest["layers"]]


def _in_content_store(stack: Stack) -> set[str]:
    return set(stack.containerd.ctr("content", "ls", "-q").stdout.split())


def _theirs(stack: Stack, published: dict) -> str:
    stack.containerd.ctr("images", "import", "--snapshotter", THEIRS, str(published["archive"]))
    return _view(stack, THEIRS, "theirs")


@pytest.mark.parametrize("cached_stack", PULL_VERSIONS, indirect=True)
def test_pull_of_cached_layers_fetches_none_and_runs(cached_stack, published):
    stack, _ = cached_stack
    info = published["info"]
    reference = f"{published['registry'].host}/demo/cached:1"
    layers = _pull(stack, reference)
    assert len(layers) == 3
    assert not _in_content_store(stack) & set(layers)  # no layer was downloaded
    hits = _messages(stack, "layer from cache at prepare")
    assert [h["diff_id"] for h in hits] == info["diff_ids"]
    assert _messages(stack, "converting layer") == []
    assert _messages(stack, "layer from cache") == []  # no Apply reached the differ
    signed = published["report"]["devices"]["layers"]
    for chain, root in zip(chain_ids(info["diff_ids"]), signed, strict=True):
        labels = json.loads(
            stack.containerd.ctr("snapshots", "--snapshotter", OURS, "info", chain).stdout
        )["Labels"]
        assert labels["containerd.io/snapshot/erofs.verity.root-hash"] == root
    ours = stack.containerd.run_output(OURS, reference, "ours", LIST_SCRIPT)
    assert "/data" in ours and ours == _theirs(stack, published)


@pytest.mark.parametrize("cached_stack", PULL_VERSIONS, indirect=True)
def test_pull_fetches_and_converts_from_the_first_refused_or_missing_layer(cached_stack, published):
    stack, cache = cached_stack
    info = published["info"]
    _flip(blob_path(cache, info["diff_ids"][1]), 100)  # layer 2: corrupt
    blob_path(cache, info["diff_ids"][2]).unlink()  # layer 3: a miss
    reference = f"{published['registry'].host}/demo/cached:1"
    layers = _pull(stack, reference)
    fetched = _in_content_store(stack)
    # containerd's unpacker starts fetching at the first layer it must apply
    assert [digest in fetched for digest in layers] == [False, True, True]
    hits = _messages(stack, "layer from cache at prepare")
    assert [h["diff_id"] for h in hits] == info["diff_ids"][:1]
    refused = _messages(stack, "layer cache entry refused at prepare, the layer will be fetched")
    assert [r["diff_id"] for r in refused] == [info["diff_ids"][1]]
    assert "does not match its hash" in refused[0]["reason"]
    assert [c["digest"] for c in _messages(stack, "converting layer")] == layers[1:]
    ours = stack.containerd.run_output(OURS, reference, "ours", LIST_SCRIPT)
    assert "/data" in ours and ours == _theirs(stack, published)


# -- Prepare's hit, on the snapshotter itself -------------------------------------------------


def _close(sn) -> None:
    """Close SN and unmount the parent layers its Prepares mounted (as `serve` leaves them)."""
    from snapshotter.service import hostmount

    sn.close()
    for directory in (sn.root / "snapshots").iterdir():
        hostmount.unmount_all(directory / "fs")


def _unpack_prepare(sn, chain: list[str], i: int, nonce: str, parent: str = "") -> None:
    labels = {"containerd.io/snapshot.ref": chain[i]}
    sn.prepare(f"default/{nonce}/extract-{nonce} {chain[i]}", parent, labels)


def test_prepare_hit_commits_the_chain_id_once_even_when_raced(published, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from snapshotter.errors import AlreadyExists
    from snapshotter.service.snapshots import Snapshotter
    from snapshotter.service.store import Kind

    info = published["info"]
    chain = chain_ids(info["diff_ids"])
    sn = Snapshotter(tmp_path / "root", layer_caches=[published["cache"]])
    try:
        # four pulls (other namespaces) of each layer at once; rounds 3 and 4 find it made
        for round_ in range(5):
            layer = round_ % 3
            parent = chain[layer - 1] if layer else ""
            with ThreadPoolExecutor(4) as pool:
                futures = [
                    pool.submit(_unpack_prepare, sn, chain, layer, f"{round_}{n}", parent)
                    for n in range(4)
                ]
            for future in futures:
                with pytest.raises(AlreadyExists):
                    future.result()
            snaps = {i.name: i for i in sn.walk()}
            assert snaps[chain[layer]].kind == Kind.COMMITTED
            assert snaps[chain[layer]].parent == parent
            assert all(i.kind == Kind.COMMITTED for i in snaps.values())  # no extraction left
        labels = sn.stat(chain[1]).labels
        assert (
            labels["containerd.io/snapshot/erofs.verity.root-hash"]
            == published["report"]["devices"]["layers"][1]
        )
        with mounted_erofs(sn.layout.layer(sn.store.get_info(chain[0])[0])) as mnt:
            assert (mnt / "bin/busybox").is_file()
    finally:
        _close(sn)


def test_prepare_with_a_refused_entry_is_a_normal_prepare(published, tmp_path):
    from snapshotter.service.snapshots import Snapshotter
    from snapshotter.service.store import Kind

    info = published["info"]
    chain = chain_ids(info["diff_ids"])
    cache_dir = tmp_path / "cache"
    shutil.copytree(published["cache"], cache_dir)
    _flip(blob_path(cache_dir, info["diff_ids"][0]), 100)
    sn = Snapshotter(tmp_path / "root", layer_caches=[cache_dir])
    try:
        key = f"default/1/extract-1 {chain[0]}"
        mounts = sn.prepare(key, "", {"containerd.io/snapshot.ref": chain[0]})
        assert mounts
        assert [(i.name, i.kind) for i in sn.walk()] == [(key, Kind.ACTIVE)]
        assert sn.layer_cache.hits == 0
    finally:
        _close(sn)


def test_vm_mode_rootfs_over_layers_committed_at_prepare_verifies_against_the_publisher(
    published, tmp_path
):
    """A keyless VM-mode node whose layers all came from the cache at Prepare: the rootfs over
    them has the roots the publisher signed (`manifest verify --snapshot`)."""
    from snapshotter.errors import AlreadyExists
    from snapshotter.service.snapshots import Snapshotter
    from snapshotter.service.vm_mode import MOUNT_TYPE

    chain = chain_ids(published["info"]["diff_ids"])
    root = tmp_path / "root"
    sn = Snapshotter(root, vm_mode=True, layer_caches=[published["cache"]])
    try:
        for i in range(3):
            with pytest.raises(AlreadyExists):
                _unpack_prepare(sn, chain, i, str(i), chain[i - 1] if i else "")
        assert sn.layer_cache.hits == 3
        mounts = sn.prepare("rootfs", chain[2], {})
        assert [m.type for m in mounts] == [MOUNT_TYPE]  # the VM-mode rootfs over the chain
    finally:
        _close(sn)
    image = f"{published['registry'].host}/demo/cached:1"
    fetched = tmp_path / "fetched"
    ok_json("manifest", "fetch", image, "--out", fetched, "--plain-http")
    report = ok_json(
        "manifest",
        "verify",
        fetched,
        "--trust",
        f"{published['key']}.pub",
        "--snapshot",
        root / "rootfs",
        "--image",
        published["report"]["image_digest"],
    )
    devices = published["report"]["devices"]
    assert report["roots"] == [devices["fsmeta"], *devices["layers"]]
