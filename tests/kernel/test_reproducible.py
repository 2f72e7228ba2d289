"""Reproducible conversion (docs/erofs.md "Reproducibility"): the same layer, by diffID, becomes
the same EROFS bytes and dm-verity root whatever compression it arrived in, however many
conversions run at once, and whatever the converting process's environment (clock, time zone,
umask, directory); a native EROFS layer's salt follows the same rule (its digest is its
diffID); the same chain merges to the same fsmeta and root. veritysetup is the judge of the
roots."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from snapshotter.fsmeta.merge import LayerBlob, merge_layers
from snapshotter.ingest.convert import convert_layer, import_erofs_image
from snapshotter.verity.params import derive_salt
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
        entries.append(Entry(f"usr/f{i}", data=rng.randbytes(size), mode=0o644,
                             mtime=1_700_000_000 + rng.randrange(1000)))
    entries += [Entry("etc/link", "symlink", link="../usr/f1"),
                Entry("usr/hard", "hardlink", link="usr/f2"),
                Entry("etc/x", data=b"x", xattrs={"user.k": b"v"})]
    return entries


@pytest.fixture(scope="module")
def layer_tar(tmp_path_factory) -> Path:
    return write_tar(tmp_path_factory.mktemp("repro") / "layer.tar", layer_entries(13))


def veritysetup_root(path: Path, info) -> str:
    """The root hash veritysetup computes for the tree appended at info.hash_offset."""
    proc = subprocess.run(
        [require_tool("veritysetup"), "verify", str(path), str(path), info.root_hash,
         f"--hash-offset={info.hash_offset}"], capture_output=True, text=True)
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
        assert r.verity.salt == derive_salt(diff_id).hex()
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
    """Another clock zone, umask, working directory and SOURCE_DATE_EPOCH: same bytes."""
    outs = []
    for i, env in enumerate([{"TZ": "UTC"}, {"TZ": "Pacific/Kiritimati",
                                             "SOURCE_DATE_EPOCH": "1", "LC_ALL": "C"}]):
        cwd = tmp_path / f"cwd{i}"
        cwd.mkdir()
        out = tmp_path / f"env{i}.erofs"
        proc = subprocess.run(
            [*CLI, "convert", str(layer_tar), str(out), "--verity", "--json"],
            cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True, timeout=60,
            preexec_fn=(lambda m=0o077 if i else 0o022: os.umask(m)))
        assert proc.returncode == 0, proc.stderr
        outs.append((sha256_file(out), json.loads(proc.stdout)["verity"]["root_hash"]))
    assert outs[0] == outs[1]


def test_native_layer_salt_is_its_diffid_which_is_its_digest(layer_tar, tmp_path):
    """A converted image arriving as a native EROFS layer: its diffID is its digest, and its
    tree is salted from that, exactly as a tar's is salted from the tar's diffID."""
    converted = convert_layer(layer_tar, tmp_path / "c.erofs", blob_digest=True)
    native_digest = sha256_file(tmp_path / "c.erofs")
    assert native_digest == converted.blob_digest
    roots = set()
    for i in range(2):
        with open(tmp_path / "c.erofs", "rb") as f:
            r = import_erofs_image(f, tmp_path / f"n{i}.erofs", expected_digest=native_digest,
                                   verity=True)
        assert r.diff_id == native_digest
        assert r.verity.salt == derive_salt(native_digest).hex()
        veritysetup_root(tmp_path / f"n{i}.erofs", r.verity)
        roots.add(r.verity.root_hash)
    assert len(roots) == 1


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
        m = merge_layers([LayerBlob(p, tag=digest[7:]) for p, digest in blobs],
                         d / "image.fsmeta", verity=True)
        veritysetup_root(d / "image.fsmeta", m.verity)
        results.append((sha256_file(d / "image.fsmeta"), m.verity.root_hash))
    assert results[0] == results[1]

