"""Format-1 block hashing: digest = H(salt || block), for a run of equal-sized blocks.

Two implementations, giving the same bytes (tests/unit/test_verity_hashing.py):
- the compiled accelerator `snapshotter.verity._hashrun` (our C, `_hashrun.c`): libcrypto's
  EVP in a C loop with the GIL released, so threads hash on every core; optional: it is used
  when it was built and imported, for the hashes it supports (`ACCELERATED_HASHES`);
- the pure-Python loop: the salt is hashed once into a base context that each block copies,
  over memoryview slices (no copies of the data), the fastest pure-Python loop we measured.
  It holds the GIL: threads do not speed it up.

`EROFS_PASSTHROUGH_PURE=1` in the environment (read at import) forces the pure path. Speeds:
docs/benchmarks.md, "dm-verity format".
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from snapshotter.accel import compiled

Buffer = bytes | bytearray | memoryview

#: the hash names the accelerator is used for (the ones VerityParams accepts)
ACCELERATED_HASHES = frozenset({"sha256", "sha512"})

_hashrun = compiled("snapshotter.verity._hashrun")  # (accel.py; not built without libssl-dev)
_accelerated: Callable[[str, Buffer, Buffer, int], bytes] | None = (
    None if _hashrun is None else _hashrun.hash_run
)

#: True when the compiled loop is in use (not forced off, built and importable)
ACCELERATED = _accelerated is not None


class SaltedBase:
    """A hash name and salt, with a hashlib context that has the salt already fed in.

    `copy()` gives that context's copy (what the pure loop starts each block from); the
    accelerator takes `name` and `salt` instead.
    """

    __slots__ = ("_ctx", "name", "salt")

    def __init__(self, hash_name: str, salt: bytes) -> None:
        self.name = hash_name
        self.salt = bytes(salt)
        self._ctx = hashlib.new(hash_name)
        self._ctx.update(self.salt)

    def copy(self) -> Any:
        return self._ctx.copy()

    @property
    def digest_size(self) -> int:
        return self._ctx.digest_size


def salted_base(hash_name: str, salt: bytes) -> SaltedBase:
    """The salted starting point of every block's hash; pass it to `hash_run`."""
    return SaltedBase(hash_name, salt)


def hash_run(base: SaltedBase, data: Buffer, block_size: int) -> bytes:
    """The concatenated digests of the whole blocks in `data` (its length is a multiple).

    With the accelerator the GIL is released while hashing: safe to call from threads.
    """
    if _accelerated is not None and base.name in ACCELERATED_HASHES:
        return _accelerated(base.name, base.salt, data, block_size)
    return hash_run_pure(base, data, block_size)


def hash_run_pure(base: SaltedBase, data: Buffer, block_size: int) -> bytes:
    """`hash_run` in pure Python, whatever the accelerator (the reference the tests compare)."""
    view = memoryview(data).cast("B")
    copy = base.copy
    out = bytearray()
    for off in range(0, len(view), block_size):
        h = copy()
        h.update(view[off : off + block_size])
        out += h.digest()
    return bytes(out)


def hash_run_accelerated(base: SaltedBase, data: Buffer, block_size: int) -> bytes:
    """`hash_run` through the compiled loop; RuntimeError if it is not in use."""
    if _accelerated is None:
        raise RuntimeError("the compiled verity hashing loop is not built or is turned off")
    return _accelerated(base.name, base.salt, data, block_size)
