"""Reproducible conversion (docs/erofs.md "Reproducibility"): the same layer, by diffID, becomes
the same EROFS bytes and dm-verity root whatever compression it arrived in, however many
conversions run at once, and whatever the converting process's environment (clock, time zone,
umask, directory); the EROFS image a tar converts to, imported as a native EROFS layer, gets
the same salt and root (the salt derives from the image's UUID), and one without a UUID is
salted from its digest; the same chain merges to the same fsmeta and root. veritysetup is the
judge of the roots."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from snapshotter.errors import EpError
from snapshotter.fsmeta.merge import LayerBlob, merge_layers
from snapshotter.ingest.convert import LAYER_UUID_NAMESPACE, convert_layer, import_erofs_image
from snapshotter.verity.params import derive_layer_salt, derive_salt
from tests.support.helpers import require_tool
from tests.support.layers import Entry, compress, write_tar

CLI = [sys.executable, "-m", "shim_integration.cli"]


def sha256_file(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def layer_entries(seed: int) -> list[Entry]:
    rng = random.Random(seed)
    entries = [Entry("etc", "dir", mode=0o755), Entry("usr", "dir", mode=0o755)]
    for i in range(40):
        size = rng.choice([0, 1, 100, 4095, 4096, 4097, 70_000])
        entries.append(
            Entry(
                f"usr/f{i}",
                data=rng.randbytes(size),
                mode=0o644,
                mtime=1_700_000_000 + rng.randrange(1000),
            )
        )
    entries += [
        Entry("etc/link", "symlink", link="../usr/f1"),
        Entry("usr/hard", "hardlink", link="usr/f2"),
        Entry("etc/x", data=b"x", xattrs={"user.k": b"v"}),
    ]
    return entries


@pytest.fixture(scope="module")
def layer_tar(tmp_path_factory) -> Path:
    return write_tar(tmp_path_factory.mktemp("repro") / "layer.tar", layer_entries(13))


def veritysetup_root(path: Path, info) -> str:
    """The root hash veritysetup computes for the tree appended at info.hash_offset."""
    proc = subprocess.run(
        [
            require_tool("veritysetup"),
            "verify",
            str(path),
            str(path),
            info.root_hash,
            f"--hash-offset={info.hash_offset}",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    return info.root_hash


def test_same_layer_in_any_compression_gives_same_bytes_and_root(layer_tar, tmp_path):
    diff_id = sha256_file(layer_tar)
    results = {}
    for how in ("tar", "gzip", "zstd"):
        source = layer_tar if how == "tar" else compress(layer_tar, how)
        out = tmp_path / f"{how}.erofs"
        r = convert_layer(source, out, expected_diff_id=diff_id, verity=True, blob_digest=True)
        assert r.diff_id == diff_id
        assert r.uuid == str(uuid.uuid5(LAYER_UUID_NAMESPACE, diff_id))
        assert r.verity.salt == derive_layer_salt(uuid.UUID(r.uuid).bytes).hex()
        veritysetup_root(out, r.verity)
        results[how] = (sha256_file(out), r.verity.root_hash, r.blob_digest)
    assert results["gzip"] == results["tar"] == results["zstd"], results


def test_concurrent_conversions_give_same_bytes(layer_tar, tmp_path):
    """Four conversions at once (as the differ's workers run them) and one alone agree."""
    alone = convert_layer(layer_tar, tmp_path / "alone.erofs", verity=True)

    def one(i: int) -> tuple[str, str]:
        out = tmp_path / f"w{i}.erofs"
        r = convert_layer(layer_tar, out, verity=True)
        return sha256_file(out), r.verity.root_hash

    with ThreadPoolExecutor(4) as pool:
        got = set(pool.map(one, range(8)))
    assert got == {(sha256_file(tmp_path / "alone.erofs"), alone.verity.root_hash)}


def test_environment_does_not_change_the_output(layer_tar, tmp_path):
    """Another clock zone, umask, working directory and SOURCE_DATE_EPOCH, and the verity
    leaves hashed by the pure-Python loop instead of the compiled one: same bytes."""
    outs = []
    for i, env in enumerate(
        [
            {"TZ": "UTC", "EROFS_PASSTHROUGH_PURE": "0"},
            {
                "TZ": "Pacific/Kiritimati",
                "SOURCE_DATE_EPOCH": "1",
                "LC_ALL": "C",
                "EROFS_PASSTHROUGH_PURE": "1",
            },
        ]
    ):
        cwd = tmp_path / f"cwd{i}"
        cwd.mkdir()
        out = tmp_path / f"env{i}.erofs"
        proc = subprocess.run(
            [*CLI, "convert", str(layer_tar), str(out), "--verity", "--json"],
            cwd=cwd,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=60,
            preexec_fn=(lambda m=0o077 if i else 0o022: os.umask(m)),
        )
        assert proc.returncode == 0, proc.stderr
        outs.append((sha256_file(out), json.loads(proc.stdout)["verity"]["root_hash"]))
    assert outs[0] == outs[1]


def test_converted_image_imported_as_native_layer_gets_the_same_root(layer_tar, tmp_path):
    """The one-root rule: a tar converted with its tree, and the EROFS image it converted to
    (the tree cut off, as `publish --layers` pushes it) imported as a native layer, twice:
    same salt, same tree, same root. The native layer's diffID is its digest, not the tar's."""
    tar = convert_layer(layer_tar, tmp_path / "t.erofs", verity=True, blob_digest=True)
    image = (tmp_path / "t.erofs").read_bytes()[: tar.size]
    (tmp_path / "native.erofs").write_bytes(image)
    native_digest = sha256_file(tmp_path / "native.erofs")
    assert native_digest == tar.blob_digest
    for i in range(2):
        with open(tmp_path / "native.erofs", "rb") as f:
            r = import_erofs_image(
                f, tmp_path / f"n{i}.erofs", expected_digest=native_digest, verity=True
            )
        assert r.diff_id == native_digest != tar.diff_id
        assert r.uuid == tar.uuid
        assert (r.verity.salt, r.verity.root_hash) == (tar.verity.salt, tar.verity.root_hash)
        assert (tmp_path / f"n{i}.erofs").read_bytes() == (tmp_path / "t.erofs").read_bytes()
        veritysetup_root(tmp_path / f"n{i}.erofs", r.verity)


def test_native_image_without_uuid_is_salted_from_its_digest(tmp_path):
    """mkfs.erofs with the nil UUID: no UUID to derive from, so the salt derives from the
    blob's digest (which is the native layer's diffID)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "file").write_bytes(b"no uuid\n")
    image = tmp_path / "nil.erofs"
    proc = subprocess.run(
        [require_tool("mkfs.erofs"), "--quiet", "-U", str(uuid.UUID(int=0)), str(image), str(src)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    digest = sha256_file(image)
    with open(image, "rb") as f:
        r = import_erofs_image(f, tmp_path / "stored.erofs", expected_digest=digest, verity=True)
    assert r.uuid == str(uuid.UUID(int=0))
    assert r.verity.salt == derive_salt(digest).hex()
    veritysetup_root(tmp_path / "stored.erofs", r.verity)


def test_same_chain_merges_to_same_fsmeta_and_root(tmp_path):
    blobs = []
    for seed in (1, 2, 3):
        tar = write_tar(tmp_path / f"l{seed}.tar", layer_entries(seed))
        out = tmp_path / f"l{seed}.erofs"
        r = convert_layer(tar, out, verity=True, blob_digest=True)
        blobs.append((out, r.blob_digest))
    results = []
    for run in ("a", "b"):
        d = tmp_path / run
        d.mkdir()
        m = merge_layers(
            [LayerBlob(p, tag=digest[7:]) for p, digest in blobs], d / "image.fsmeta", verity=True
        )
        veritysetup_root(d / "image.fsmeta", m.verity)
        results.append((sha256_file(d / "image.fsmeta"), m.verity.root_hash))
    assert results[0] == results[1]


def test_layer_salt_derives_from_the_uuid_and_needs_a_digest_without_one():
    some = uuid.uuid4().bytes
    assert derive_layer_salt(some) == derive_layer_salt(some, "sha256:" + "0" * 64)
    assert derive_layer_salt(some) != derive_layer_salt(uuid.uuid4().bytes)
    assert derive_layer_salt(bytes(16), "sha256:" + "1" * 64) == derive_salt("1" * 64)
    with pytest.raises(EpError, match="without a UUID needs its digest"):
        derive_layer_salt(bytes(16))
    with pytest.raises(EpError, match="16 bytes"):
        derive_layer_salt(b"short")
