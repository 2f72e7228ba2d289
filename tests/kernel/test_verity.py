"""dm-verity: our trees against `veritysetup` (cryptsetup-bin) as the oracle.

Every comparison is byte for byte over the whole hash area (superblock, padding, every level)
plus the root hash; veritysetup also verifies our appended trees and must reject them after
one flipped byte.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from shim_integration.cli import main as cli_main
from snapshotter.errors import EpError
from snapshotter.verity import (
    VerityInfo,
    VerityParams,
    VeritySuperblock,
    VerityTreeBuilder,
    derive_salt,
    format_file,
    hashing,
    read_superblock,
    verify_file,
)
from snapshotter.verity.digests import DigestStore
from snapshotter.verity.geometry import TreeGeometry, tree_start_block
from snapshotter.verity.parallel import RANGE_BYTES, file_leaf_digests
from snapshotter.verity.params import parse_uuid as uuid_bytes
from tests.support.helpers import require_tool

SALT = bytes(range(32))


def rand_bytes(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


def veritysetup() -> str:
    return require_tool("veritysetup")


def vs_format(
    data: Path,
    hash_file: Path,
    p: VerityParams,
    *,
    uuid: str | None = None,
    hash_offset: int | None = None,
    data_blocks: int | None = None,
) -> str:
    cmd = [
        veritysetup(),
        "format",
        str(data),
        str(hash_file),
        f"--hash={p.hash_name}",
        f"--data-block-size={p.data_block_size}",
        f"--hash-block-size={p.hash_block_size}",
        f"--salt={p.salt.hex() or '-'}",
    ]
    if not p.superblock:
        cmd.append("--no-superblock")
    if uuid:
        cmd.append(f"--uuid={uuid}")
    if hash_offset is not None:
        cmd.append(f"--hash-offset={hash_offset}")
    if data_blocks is not None:
        cmd.append(f"--data-blocks={data_blocks}")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return next(
        line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Root hash")
    )


def vs_verify(
    data: Path, hash_file: Path, root: str, hash_offset: int
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [veritysetup(), "verify", str(data), str(hash_file), root, f"--hash-offset={hash_offset}"],
        capture_output=True,
        text=True,
    )


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ 0x40]))


def blocks_for(shape: str, p: VerityParams) -> int:
    per = p.hash_block_size // p.digest_size
    return {
        "one": 1,  # no tree: the root is the block's digest
        "one-level": per - 1,
        "two-level": per * 3,
        "odd": per * 5 + 3,  # partial last hash block
        "three-level": per * per + 7,
    }[shape]


# --- byte compatibility with veritysetup format -------------------------------------------


@pytest.mark.parametrize("shape", ["one", "one-level", "two-level", "odd", "three-level"])
@pytest.mark.parametrize("superblock", [True, False], ids=["sb", "nosb"])
@pytest.mark.parametrize(
    "sizes", [(4096, 4096), (512, 4096), (4096, 512), (512, 512)], ids=lambda s: f"{s[0]}-{s[1]}"
)
@pytest.mark.parametrize("hash_name", ["sha256", "sha512"])
def test_separate_hash_file_matches_veritysetup(tmp_path, hash_name, sizes, superblock, shape):
    p = VerityParams(
        hash_name=hash_name,
        data_block_size=sizes[0],
        hash_block_size=sizes[1],
        salt=SALT,
        superblock=superblock,
    )
    n = blocks_for(shape, p)
    geo = TreeGeometry.compute(n, p.hash_block_size, p.digest_size)
    levels = {"one": 0, "one-level": 1, "two-level": 2, "odd": 2, "three-level": 3}
    assert geo.levels == levels[shape]
    data = tmp_path / "data"
    data.write_bytes(rand_bytes(n * p.data_block_size, seed=n))
    ours, theirs = tmp_path / "ours.hash", tmp_path / "theirs.hash"
    info = format_file(data, hash_path=ours, params=p)
    root = vs_format(data, theirs, p, uuid=info.uuid)
    assert info.root_hash == root
    assert info.data_blocks == n
    assert ours.read_bytes() == theirs.read_bytes()


@pytest.mark.parametrize("salt_len", [0, 1, 31, 255, 256])
def test_salt_lengths_match_veritysetup(tmp_path, salt_len):
    p = VerityParams(salt=rand_bytes(salt_len, seed=salt_len), hash_block_size=512)
    data = tmp_path / "data"
    data.write_bytes(rand_bytes(40 * 4096))
    info = format_file(data, hash_path=tmp_path / "ours", params=p)
    assert info.salt == p.salt.hex()
    assert info.root_hash == vs_format(data, tmp_path / "theirs", p, uuid=info.uuid)
    assert (tmp_path / "ours").read_bytes() == (tmp_path / "theirs").read_bytes()
    sb = read_superblock(tmp_path / "theirs")
    assert sb.salt == p.salt


@pytest.mark.parametrize(
    "p",
    [
        VerityParams(salt=SALT),  # containerd's layout
        VerityParams(salt=SALT, data_block_size=512, hash_block_size=4096),
        VerityParams(salt=SALT, hash_name="sha512", data_block_size=4096, hash_block_size=512),
        VerityParams(salt=SALT, superblock=False),
        # tree must start on a hash block: data padded to 4096 although blocks are 512
        VerityParams(salt=SALT, superblock=False, data_block_size=512, hash_block_size=4096),
    ],
    ids=["containerd", "512-4096", "sha512-4096-512", "nosb", "nosb-512-4096"],
)
def test_appended_tree_matches_veritysetup(tmp_path, p):
    size = 123_457  # not a whole block
    original = rand_bytes(size)
    ours = tmp_path / "ours"
    ours.write_bytes(original)
    info = format_file(ours, params=p)
    align = p.data_block_size if p.superblock else max(p.data_block_size, p.hash_block_size)
    assert info.hash_offset == -(-size // align) * align
    assert info.data_blocks * p.data_block_size == info.hash_offset
    # the same padded data, formatted in place by veritysetup
    theirs = tmp_path / "theirs"
    theirs.write_bytes(original)
    os.truncate(theirs, info.hash_offset)
    root = vs_format(
        theirs,
        theirs,
        p,
        uuid=info.uuid,
        hash_offset=info.hash_offset,
        data_blocks=info.data_blocks,
    )
    assert info.root_hash == root
    assert ours.read_bytes() == theirs.read_bytes()
    assert ours.read_bytes()[:size] == original
    assert not any(ours.read_bytes()[size : info.hash_offset])  # zero padding


def test_veritysetup_verifies_appended_tree_and_rejects_flips(tmp_path):
    f = tmp_path / "layer.erofs"
    f.write_bytes(rand_bytes(300 * 4096 + 1000))
    info = format_file(f, params=VerityParams(salt=SALT))
    assert vs_verify(f, f, info.root_hash, info.hash_offset).returncode == 0
    verify_file(f, info)

    bad_data = 77 * 4096 + 5
    flip(f, bad_data)
    assert vs_verify(f, f, info.root_hash, info.hash_offset).returncode != 0
    with pytest.raises(EpError, match=r"data block 77 \("):
        verify_file(f, info)
    flip(f, bad_data)
    assert vs_verify(f, f, info.root_hash, info.hash_offset).returncode == 0

    # one byte in the leaf level (the last level on disk), then in the top level
    geo = TreeGeometry.compute(info.data_blocks, 4096, 32)
    assert geo.levels == 2
    leaf_level = geo.level_offset(0, info.hash_start_block * 4096)
    flip(f, leaf_level + 4096 + 100)
    assert vs_verify(f, f, info.root_hash, info.hash_offset).returncode != 0
    with pytest.raises(EpError, match=r"hash block 1 of level 0 \(byte \d+ of .*\) does not"):
        verify_file(f, info)
    flip(f, leaf_level + 4096 + 100)
    flip(f, geo.level_offset(1, info.hash_start_block * 4096) + 5)
    assert vs_verify(f, f, info.root_hash, info.hash_offset).returncode != 0
    with pytest.raises(EpError, match=r"top hash block .* does not match the root hash"):
        verify_file(f, info)


def test_verify_names_tampered_hash_block_below_the_top(tmp_path):
    p = VerityParams(salt=SALT, hash_block_size=512)  # 16 digests a block: 3 levels quickly
    f = tmp_path / "data"
    f.write_bytes(rand_bytes(300 * 4096))
    info = format_file(f, params=p)
    geo = TreeGeometry.compute(info.data_blocks, 512, 32)
    assert geo.levels == 3
    tree = info.hash_start_block * 512
    flip(f, geo.level_offset(0, tree) + 3 * 512 + 7)  # leaf hash block 3
    with pytest.raises(EpError, match=r"hash block 3 of level 0 .* hash tree is corrupted"):
        verify_file(f, info)
    assert vs_verify(f, f, info.root_hash, info.hash_offset).returncode != 0


def test_verify_accepts_veritysetup_tree_and_wrong_root_fails(tmp_path):
    data, hashf = tmp_path / "data", tmp_path / "hash"
    data.write_bytes(rand_bytes(64 * 4096))
    p = VerityParams(salt=SALT, hash_name="sha512")
    root = vs_format(data, hashf, p)  # random UUID: take the params from its superblock
    sb = read_superblock(hashf)
    assert (sb.algorithm, sb.data_blocks, sb.salt) == ("sha512", 64, SALT)
    verify_file(data, p, hash_path=hashf, root_hash=root)
    wrong = ("0" if root[0] != "0" else "1") + root[1:]
    with pytest.raises(EpError, match="root hash"):
        verify_file(data, p, hash_path=hashf, root_hash=wrong)
    with pytest.raises(EpError, match=r"superblock .* salt"):
        verify_file(
            data, VerityParams(salt=b"x", hash_name="sha512"), hash_path=hashf, root_hash=root
        )


def test_verify_rejects_nonzero_spare_area(tmp_path):
    f = tmp_path / "data"
    f.write_bytes(rand_bytes(5 * 4096))
    info = format_file(f, params=VerityParams(salt=SALT))
    # the one hash block holds 5 digests, the rest is spare; the root covers it, so also
    # the root must be recomputed for the spare check itself to be what fails
    tree = info.hash_start_block * 4096
    block = bytearray(f.read_bytes()[tree : tree + 4096])
    block[4000] = 1
    with open(f, "r+b") as fh:
        fh.seek(tree)
        fh.write(block)
    base = hashlib.sha256(SALT)
    base.update(block)
    with pytest.raises(EpError, match=r"spare area .* not zero"):
        verify_file(f, info, root_hash=base.hexdigest())


# --- streaming builder ----------------------------------------------------------------------


def test_streaming_out_of_order_equals_format_file(tmp_path):
    p = VerityParams(salt=SALT, hash_block_size=1024)
    n = 700
    data = rand_bytes(n * 4096, seed=7)
    (tmp_path / "data").write_bytes(data)
    expected = format_file(tmp_path / "data", hash_path=tmp_path / "ref", params=p)

    # as the converter does: blocks 1.. in uneven runs, the trailing blocks, block 0 last
    runs = [(1, 5), (5, 6), (6, 300), (300, 650), (690, 700), (650, 690), (0, 1)]
    b = VerityTreeBuilder(p)
    for lo, hi in runs:
        b.hash_blocks(lo, memoryview(data)[lo * 4096 : hi * 4096])
    out = tmp_path / "stream"
    with open(out, "w+b") as f:
        info = b.finish(n, f, 0)
    assert info == expected
    assert out.read_bytes() == (tmp_path / "ref").read_bytes()


def test_streaming_from_several_threads_equals_veritysetup(tmp_path):
    """A converter's background hashing: threads calling hash_blocks at once, runs in any
    order, give veritysetup's tree."""
    p = VerityParams(salt=SALT)
    n = 3000
    data = rand_bytes(n * 4096, seed=13)
    (tmp_path / "data").write_bytes(data)
    uuid = "12345678-1234-8234-9234-123456789abc"
    root = vs_format(tmp_path / "data", tmp_path / "ref", p, uuid=uuid)
    b = VerityTreeBuilder(VerityParams(salt=SALT, uuid=uuid_bytes(uuid)))
    runs = [(lo, min(n, lo + 37)) for lo in range(0, n, 37)]
    random.Random(5).shuffle(runs)
    errors: list[BaseException] = []

    def feed(k: int) -> None:
        try:
            for lo, hi in runs[k::4]:
                b.hash_blocks(lo, memoryview(data)[lo * 4096 : hi * 4096])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=feed, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with open(tmp_path / "stream", "w+b") as f:
        assert b.finish(n, f, 0).root_hash == root
    assert (tmp_path / "stream").read_bytes() == (tmp_path / "ref").read_bytes()


def test_streaming_spills_to_disk_with_same_result(tmp_path):
    p = VerityParams(salt=SALT, data_block_size=512, hash_block_size=512)
    n = 3000
    data = rand_bytes(n * 512, seed=3)
    results = []
    for limit in (1 << 30, 4096):  # all in memory / spilled after 128 digests
        b = VerityTreeBuilder(p, memory_limit=limit, tmp_dir=tmp_path)
        for lo in reversed(range(0, n, 250)):
            b.hash_blocks(lo, data[lo * 512 : (lo + 250) * 512])
        assert b._leaves.spilled == (limit == 4096)
        out = tmp_path / f"out-{limit}"
        with open(out, "w+b") as f:
            results.append((b.finish(n, f, 0), out.read_bytes()))
    assert results[0] == results[1]
    assert list(tmp_path.glob("verity-digests-*")) == []  # unnamed temp files


def test_digest_store_reads_back_across_spill(tmp_path):
    s = DigestStore(32, memory_limit=32 * 10, tmp_dir=tmp_path)
    s.put(5, b"a" * 32)
    assert not s.spilled
    s.put(20, b"b" * 64)
    assert s.spilled
    assert s.read(4, 3) == bytes(32) + b"a" * 32 + bytes(32)
    assert s.read(20, 3) == b"b" * 64 + bytes(32)  # beyond the end reads as zeros
    s.close()


def test_builder_refuses_misuse(tmp_path):
    p = VerityParams(salt=SALT)
    b = VerityTreeBuilder(p)
    with pytest.raises(EpError, match="not whole 4096-byte blocks"):
        b.hash_blocks(0, bytes(4095))
    b.hash_blocks(0, bytes(8192))
    with pytest.raises(EpError, match="data block 1 was already hashed"):
        b.hash_blocks(1, bytes(4096))
    b.hash_blocks(3, bytes(4096))
    with (
        open(tmp_path / "h", "w+b") as f,
        pytest.raises(EpError, match="data block 2 of 4 was never hashed"),
    ):
        b.finish(4, f, 0)
    with pytest.raises(EpError, match="already finished"):
        b.hash_blocks(2, bytes(4096))
    b = VerityTreeBuilder(p)
    b.hash_blocks(0, bytes(3 * 4096))
    with open(tmp_path / "h", "w+b") as f, pytest.raises(EpError, match="only 2 data blocks"):
        b.finish(2, f, 0)
    b = VerityTreeBuilder(VerityParams(salt=SALT, superblock=False, data_block_size=512))
    b.hash_blocks(0, bytes(512))
    with open(tmp_path / "h", "w+b") as f, pytest.raises(EpError, match="multiple of the hash"):
        b.finish(1, f, 512)


# --- parameters -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (VerityParams(data_block_size=3000), "data block size 3000 must be a power of two"),
        (VerityParams(hash_block_size=8192), "hash block size 8192 must be a power of two"),
        (VerityParams(data_block_size=256), "data block size 256"),
        (VerityParams(salt=bytes(257)), "salt is 257 bytes, at most 256"),
        (VerityParams(hash_name="md5"), "unsupported dm-verity hash 'md5'"),
        (VerityParams(uuid=b"short"), "UUID must be 16 bytes"),
        (VerityParams(superblock=False, uuid=bytes(16)), "needs the superblock"),
    ],
)
def test_bad_parameters_are_clear_errors(params, message):
    with pytest.raises(EpError, match=message):
        params.validate()
    with pytest.raises(EpError, match=message):
        VerityTreeBuilder(params)


def test_separate_hash_file_needs_whole_blocks_and_leaves_nothing(tmp_path):
    data = tmp_path / "data"
    data.write_bytes(bytes(4097))
    with pytest.raises(EpError, match="not a whole number of 4096-byte data blocks"):
        format_file(data, hash_path=tmp_path / "h", params=VerityParams(salt=SALT))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(EpError, match="empty"):
        format_file(tmp_path / "empty", params=VerityParams(salt=SALT))
    with pytest.raises(EpError, match="No such file"):
        format_file(tmp_path / "missing")
    os.truncate(data, 4096)
    with pytest.raises(EpError, match="No such file"):
        format_file(data, hash_path=tmp_path / "no-dir" / "h", params=VerityParams(salt=SALT))


# --- salt, UUID and outputs -----------------------------------------------------------------


def test_derive_salt_is_deterministic_and_accepts_digest_forms():
    raw = hashlib.sha256(b"layer").digest()
    salt = derive_salt(raw)
    assert len(salt) == 32
    assert derive_salt(raw.hex()) == salt == derive_salt("sha256:" + raw.hex())
    assert salt not in (raw, derive_salt(hashlib.sha256(b"other").digest()))
    for bad in ("sha512:" + raw.hex(), "zz", raw[:31]):
        with pytest.raises(EpError):
            derive_salt(bad)


def test_same_blob_gives_same_tree_and_uuid(tmp_path):
    blob = rand_bytes(50_000)
    files = []
    for name in ("a", "b"):
        (tmp_path / name).write_bytes(blob)
        files.append(format_file(tmp_path / name))  # default: salt derived from the content
    assert files[0] == files[1]
    assert files[0].salt == derive_salt(hashlib.sha256(blob).digest()).hex()
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()
    sb = read_superblock(tmp_path / "a", files[0].hash_offset)
    assert sb.uuid_text == files[0].uuid
    assert sb.uuid[6] >> 4 == 8  # RFC 9562 version 8


def test_superblock_roundtrip_and_field_offsets():
    sb = VeritySuperblock(
        hash_type=1,
        uuid=bytes(range(16)),
        algorithm="sha512",
        data_block_size=512,
        hash_block_size=4096,
        data_blocks=2**40 + 3,
        salt=b"\xaa" * 256,
    )
    raw = sb.serialize()
    assert len(raw) == 512
    assert raw[:8] == b"verity\0\0"
    assert raw[32:38] == b"sha512"
    assert int.from_bytes(raw[72:80], "little") == 2**40 + 3
    assert int.from_bytes(raw[80:82], "little") == 256
    assert raw[88:344] == b"\xaa" * 256
    assert VeritySuperblock.deserialize(raw) == sb
    with pytest.raises(EpError, match="signature"):
        VeritySuperblock.deserialize(bytes(512))


def test_table_line_kata_and_containerd_outputs(tmp_path):
    f = tmp_path / "layer.erofs"
    f.write_bytes(rand_bytes(10 * 4096 + 1))
    info = format_file(f, params=VerityParams(salt=SALT))
    assert info.hash_offset == 11 * 4096
    assert info.table_line("/dev/vdb", "/dev/vdb") == (
        f"0 88 verity 1 /dev/vdb /dev/vdb 4096 4096 11 12 sha256 {info.root_hash} {SALT.hex()}"
    )
    # Kata: the tree's start (past the superblock), salt only for kata-types (test_kata_readers)
    kata = info.kata_dm_verity(kata_types_only=True).to_json()
    assert kata == {
        "hashtype": "sha256",
        "hash": info.root_hash,
        "blocknum": 11,
        "blocksize": 4096,
        "hashsize": 4096,
        "offset": 12 * 4096,
        "salt": SALT.hex(),
        "no_superblock": True,
    }
    sidecar = info.write_containerd_sidecar(f)
    assert sidecar.name == "layer.erofs.dmverity"
    assert sidecar.read_bytes() == (
        b'{\n  "roothash": "' + info.root_hash.encode() + b'",\n  "hashoffset": 45056\n}'
    )
    assert VerityInfo.from_json(json.loads(json.dumps(info.to_json()))) == info
    nosalt = VerityInfo(**{**info.__dict__, "salt": "", "superblock": False, "uuid": None})
    assert nosalt.table_line("a", "b").endswith(" 11 11 sha256 " + info.root_hash + " -")
    assert "salt" not in nosalt.kata_dm_verity().to_json()


@pytest.mark.parametrize("hbs", [512, 1024, 4096])
def test_hash_start_block_equals_katas_formula(hbs):
    # Kata: offset / hashsize + ceil(512 / hashsize) with a superblock
    for offset in range(0, 3 * 4096 + 1, 512):
        kata = offset // hbs + -(-512 // hbs)
        assert tree_start_block(offset, hbs, True) == kata


# --- whole-file hashing in threads (accelerator) or worker processes (pure Python) ---------


def _collect(f: Path, n: int, **kw) -> bytes:
    s = DigestStore(32)
    got = 0
    for b0, d in file_leaf_digests(f, n, 4096, "sha256", SALT, **kw):
        s.put(b0, d)
        got += len(d)
    assert got == 32 * n
    return s.read(0, n)


def test_parallel_hashing_gives_the_same_leaves(tmp_path):
    f = tmp_path / "data"
    f.write_bytes(rand_bytes(3 * RANGE_BYTES + 4096 * 5))  # several ranges, ragged end
    n = f.stat().st_size // 4096
    in_process = _collect(f, n, workers=1)
    for pool in ("threads", "processes"):
        assert _collect(f, n, workers=2, parallel_min_bytes=0, pool=pool) == in_process
        assert _collect(f, n, workers=3, parallel_min_bytes=0, pool=pool) == in_process
    assert _collect(f, n, workers=2, parallel_min_bytes=0) == in_process
    assert in_process[:32] == hashlib.sha256(SALT + f.read_bytes()[:4096]).digest()
    for pool in ("threads", "processes"):
        with pytest.raises(EpError, match="shorter than"):
            list(
                file_leaf_digests(
                    f, n + 1, 4096, "sha256", SALT, workers=2, parallel_min_bytes=0, pool=pool
                )
            )


def test_hashing_threads_stop_when_the_consumer_stops(tmp_path):
    """The accelerator's threads: a consumer that gives up early (an error while storing
    leaves) leaves no thread behind, and the file is closed."""
    if os.environ.get("EROFS_PASSTHROUGH_PURE", "") not in ("", "0"):
        pytest.skip("EROFS_PASSTHROUGH_PURE=1: no threads, the pure loop's processes instead")
    if not hashing.ACCELERATED:
        pytest.fail("the verity accelerator is not built: run .ci/setup")
    f = tmp_path / "data"
    f.write_bytes(rand_bytes(12 * RANGE_BYTES))
    gen = file_leaf_digests(f, 12 * RANGE_BYTES // 4096, 4096, "sha256", SALT, workers=2)
    next(gen)
    assert any(t.name.startswith("verity-hash-") for t in threading.enumerate())
    gen.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("verity-hash-")]
    assert not [p for p in Path("/proc/self/fd").iterdir() if _fd_target(p) == str(f)]


def _fd_target(p: Path) -> str:
    try:
        return os.readlink(p)
    except OSError:
        return ""


def test_large_file_in_parallel_matches_veritysetup(tmp_path):
    f = tmp_path / "data"
    f.write_bytes(rand_bytes(80 << 20, seed=9))  # above both parallel thresholds
    info = format_file(f, hash_path=tmp_path / "ours", params=VerityParams(salt=SALT), workers=2)
    root = vs_format(f, tmp_path / "theirs", VerityParams(salt=SALT), uuid=info.uuid)
    assert info.root_hash == root
    assert (tmp_path / "ours").read_bytes() == (tmp_path / "theirs").read_bytes()


@pytest.mark.parametrize("pure", ["1", "0"])
@pytest.mark.parametrize("hash_name", ["sha256", "sha512"])
def test_cli_pure_and_accelerated_paths_match_veritysetup(tmp_path, pure, hash_name):
    """The whole command in its own process, the pure-Python loop (worker processes) forced
    or not (threads over the compiled loop): the same hash file as veritysetup's."""
    f = tmp_path / "data"
    f.write_bytes(rand_bytes((80 << 20) + 4096 * 3, seed=11))
    p = VerityParams(hash_name=hash_name, salt=SALT)
    uuid = "12345678-1234-8234-9234-123456789abc"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "shim_integration.cli",
            "verity",
            "format",
            str(f),
            f"--hash-file={tmp_path / 'ours'}",
            f"--salt={SALT.hex()}",
            f"--hash={hash_name}",
            f"--uuid={uuid}",
            "--json",
        ],
        env={**os.environ, "EROFS_PASSTHROUGH_PURE": pure},
        cwd=Path(__file__).resolve().parents[2],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    root = vs_format(f, tmp_path / "theirs", p, uuid=uuid)
    assert json.loads(out)["root_hash"] == root
    assert (tmp_path / "ours").read_bytes() == (tmp_path / "theirs").read_bytes()


# --- command line ---------------------------------------------------------------------------


def test_cli_format_and_verify(tmp_path, capsys):
    f = tmp_path / "blob"
    f.write_bytes(rand_bytes(20_000))
    ref = tmp_path / "ref"
    shutil.copy(f, ref)
    assert cli_main(["verity", "format", str(f), "--salt", SALT.hex(), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["hash_offset"] == 20480 and out["data_blocks"] == 5
    assert out["salt"] == SALT.hex() and out["data_block_size"] == 4096
    os.truncate(ref, 20480)
    assert out["root_hash"] == vs_format(
        ref, ref, VerityParams(salt=SALT), uuid=out["uuid"], hash_offset=20480, data_blocks=5
    )
    assert f.read_bytes() == ref.read_bytes()

    args = ["verity", "verify", str(f), "--root-hash", out["root_hash"], "--hash-offset", "20480"]
    assert cli_main(args) == 0
    capsys.readouterr()
    flip(f, 9000)
    assert cli_main(args) == 1
    assert "data block 2 (" in capsys.readouterr().err


def test_cli_separate_hash_file_no_superblock_and_errors(tmp_path, capsys):
    f = tmp_path / "blob"
    f.write_bytes(rand_bytes(8 * 512))
    h = tmp_path / "blob.hash"
    assert (
        cli_main(
            [
                "verity",
                "format",
                str(f),
                "--hash-file",
                str(h),
                "--salt",
                "-",
                "--no-superblock",
                "--data-block-size",
                "512",
                "--hash",
                "sha512",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    root = next(line.split()[1] for line in text.splitlines() if line.startswith("root_hash"))
    p = VerityParams(hash_name="sha512", data_block_size=512, superblock=False)
    assert root == vs_format(f, tmp_path / "theirs", p)
    assert h.read_bytes() == (tmp_path / "theirs").read_bytes()
    verify = [
        "verity",
        "verify",
        str(f),
        "--hash-file",
        str(h),
        "--root-hash",
        root,
        "--no-superblock",
        "--data-block-size",
        "512",
        "--hash",
        "sha512",
    ]
    assert cli_main([*verify, "--salt", "-"]) == 0
    assert cli_main(verify) == 1
    assert "salt must be given" in capsys.readouterr().err
    assert cli_main(["verity", "format", str(f), "--data-block-size", "1000"]) == 1
    assert "power of two" in capsys.readouterr().err


def test_verify_missing_files_are_clear_errors(tmp_path):
    f = tmp_path / "data"
    f.write_bytes(rand_bytes(4096 * 3))
    info = format_file(f, hash_path=tmp_path / "h", params=VerityParams(salt=SALT))
    verify_file(f, info, tmp_path / "h")
    with pytest.raises(EpError, match="no such file"):
        verify_file(f, info, tmp_path / "missing")
    with pytest.raises(EpError, match="cannot read"):
        read_superblock(tmp_path / "missing")
