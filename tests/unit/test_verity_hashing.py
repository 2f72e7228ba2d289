"""dm-verity block hashing: the compiled loop (_hashrun.c) and the pure-Python loop give the
same digests, H(salt || block) as hashlib computes it, and the switch between them works."""

from __future__ import annotations

import hashlib
import mmap
import os
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snapshotter.verity import hashing
from snapshotter.verity.hashing import hash_run, hash_run_pure, salted_base


def _accelerator():
    """The compiled module; a missing build is a failure here (.ci/setup builds it)."""
    try:
        from snapshotter.verity import _hashrun
    except ImportError as exc:
        pytest.fail(f"the verity accelerator is not built ({exc}): run .ci/setup")
    return _hashrun


def _reference(hash_name: str, salt: bytes, data: bytes, block_size: int) -> bytes:
    return b"".join(
        hashlib.new(hash_name, salt + data[i : i + block_size]).digest()
        for i in range(0, len(data), block_size)
    )


@settings(max_examples=60, deadline=None)
@given(
    hash_name=st.sampled_from(sorted(hashing.ACCELERATED_HASHES)),
    salt=st.binary(max_size=256),
    block_size=st.sampled_from([512, 1024, 2048, 4096]),
    blocks=st.integers(min_value=0, max_value=9),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_compiled_and_pure_loops_give_hashlibs_digests(hash_name, salt, block_size, blocks, seed):
    data = bytes((seed >> (8 * (i % 4)) ^ i * 131) & 0xFF for i in range(blocks * block_size))
    want = _reference(hash_name, salt, data, block_size)
    base = salted_base(hash_name, salt)
    assert hash_run_pure(base, data, block_size) == want
    assert _accelerator().hash_run(hash_name, salt, data, block_size) == want
    assert hashing.hash_run_accelerated(base, data, block_size) == want
    assert hash_run(base, memoryview(bytearray(data)), block_size) == want


def test_compiled_loop_reads_an_mmap_and_refuses_partial_blocks(tmp_path):
    acc = _accelerator()
    data = os.urandom(64 * 4096)
    f = tmp_path / "d"
    f.write_bytes(data)
    with open(f, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m:
        view = memoryview(m)
        got = acc.hash_run("sha256", b"s", view[4096 : 9 * 4096], 4096)
        view.release()
    assert got == _reference("sha256", b"s", data[4096 : 9 * 4096], 4096)
    with pytest.raises(ValueError, match="not whole 4096-byte blocks"):
        acc.hash_run("sha256", b"", data[:5000], 4096)
    with pytest.raises(ValueError, match="no digest"):
        acc.hash_run("no-such-hash", b"", data[:4096], 4096)


def test_threads_hashing_at_once_get_their_own_digests():
    """The GIL is released inside the loop: several threads at once, each its own answer."""
    _accelerator()
    bufs = [os.urandom(256 * 4096) for _ in range(4)]
    base = salted_base("sha256", b"salt")
    got: dict[int, bytes] = {}

    def work(k: int) -> None:
        got[k] = hashing.hash_run_accelerated(base, bufs[k], 4096)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[k] for k in range(4)] == [_reference("sha256", b"salt", b, 4096) for b in bufs]
