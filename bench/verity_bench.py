"""dm-verity formatting speed: ours against `veritysetup format`, in the same run.

    python -m bench.verity_bench [--size-mib 1024] [--rounds 3] [--dir DIR]

Writes a file of random data (default 1 GiB), reads it once so both tools hash from the
page cache, then alternates, round by round:
- `veritysetup format DATA HASH --salt S` (separate hash file, v1 superblock, 4096/4096);
- `format_file(DATA, hash_path=HASH, params=VerityParams(salt=S))`: the same tree, leaves
  hashed by one worker process per CPU over mmap ranges;
- the same with `workers=1` (everything in this process);
- the streaming builder alone: `hash_blocks` over 4 MiB chunks already in memory, then
  `finish` (what the EROFS converter adds to a conversion pass).
Roots must agree. Prints the best and median time of each and the ratio to veritysetup.

    python -m bench.verity_bench --memory-gib 100

instead measures the streaming builder's peak RSS for a blob of that size (4 KiB blocks):
leaf digests are fed directly (no data), then `finish` writes the hash area to a temp file.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from snapshotter.verity import VerityParams, VerityTreeBuilder, format_file

SALT = bytes.fromhex("5a" * 32)
CHUNK = 4 << 20


def _write_random(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 64 << 20)
            f.write(os.urandom(n))
            left -= n


def _warm(path: Path) -> None:
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(8 << 20)
        while f.readinto(buf):
            pass


def _veritysetup(data: Path, hash_path: Path) -> str:
    hash_path.unlink(missing_ok=True)
    out = subprocess.run(
        ["veritysetup", "format", str(data), str(hash_path), f"--salt={SALT.hex()}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return next(
        line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Root hash")
    )


def _ours(data: Path, hash_path: Path, workers: int | None) -> str:
    hash_path.unlink(missing_ok=True)
    return format_file(
        data, hash_path=hash_path, params=VerityParams(salt=SALT), workers=workers
    ).root_hash


def _streaming(data: Path, hash_path: Path) -> tuple[str, float]:
    """Builder alone, the data already in memory chunk by chunk; returns (root, seconds)."""
    builder = VerityTreeBuilder(VerityParams(salt=SALT))
    elapsed = 0.0
    with open(data, "rb", buffering=0) as f:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        block = 0
        while n := f.readinto(buf):
            t = time.perf_counter()
            builder.hash_blocks(block, view[:n])
            elapsed += time.perf_counter() - t
            block += n // 4096
    with open(hash_path, "w+b") as out:
        t = time.perf_counter()
        root = builder.finish(block, out, 0).root_hash
        elapsed += time.perf_counter() - t
    return root, elapsed


def _memory(gib: int, tmp_dir: str | None) -> int:
    blocks = (gib << 30) // 4096
    chunk = 8192
    pattern = hashlib.sha256(b"leaf").digest() * chunk
    builder = VerityTreeBuilder(VerityParams(salt=SALT), tmp_dir=tmp_dir)
    t = time.perf_counter()
    for b0 in range(0, blocks, chunk):
        builder.add_leaf_digests(b0, pattern[: 32 * min(chunk, blocks - b0)])
    fed = time.perf_counter() - t
    with tempfile.TemporaryFile(dir=tmp_dir) as out:
        t = time.perf_counter()
        builder.finish(blocks, out, 0)
        finished = time.perf_counter() - t
        area = out.seek(0, os.SEEK_END)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    print(
        f"streaming builder, {gib} GiB blob = {blocks} leaves: feeding {fed:.1f} s, "
        f"finish {finished:.1f} s, hash area {area >> 20} MiB, peak RSS {peak} MiB"
    )
    return 0


def _timed(fn: Callable[[], str]) -> tuple[str, float]:
    t = time.perf_counter()
    root = fn()
    return root, time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.verity_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", help="where to put the data file (default: the temp directory)")
    ap.add_argument("--memory-gib", type=int, help="measure peak RSS for a blob this big")
    args = ap.parse_args(argv)
    if args.memory_gib:
        return _memory(args.memory_gib, args.dir)
    if shutil.which("veritysetup") is None:
        print("needs veritysetup (cryptsetup-bin)", file=sys.stderr)
        return 1
    size = args.size_mib << 20
    with tempfile.TemporaryDirectory(prefix="verity-bench-", dir=args.dir) as tmp:
        data, hashf = Path(tmp) / "data", Path(tmp) / "hash"
        _write_random(data, size)
        _warm(data)
        runs: dict[str, list[float]] = {}
        roots: set[str] = set()
        cases: list[tuple[str, Callable[[], tuple[str, float]]]] = [
            ("veritysetup format", lambda: _timed(lambda: _veritysetup(data, hashf))),
            ("format_file (workers=auto)", lambda: _timed(lambda: _ours(data, hashf, None))),
            ("format_file (workers=1)", lambda: _timed(lambda: _ours(data, hashf, 1))),
            ("streaming builder (in memory)", lambda: _streaming(data, hashf)),
        ]
        for _ in range(args.rounds):
            for name, case in cases:
                root, seconds = case()
                roots.add(root)
                runs.setdefault(name, []).append(seconds)
        if len(roots) != 1:
            print(f"root hashes differ: {sorted(roots)}", file=sys.stderr)
            return 1
    ref = min(runs["veritysetup format"])
    print(
        f"dm-verity format of {args.size_mib} MiB (sha256, 4096/4096, superblock), "
        f"{args.rounds} rounds, {len(os.sched_getaffinity(0))} CPUs; root {roots.pop()}"
    )
    print(f"{'':32} {'best s':>8} {'median s':>9} {'GB/s':>6} {'vs veritysetup':>15}")
    for name, times in runs.items():
        best = min(times)
        print(
            f"{name:32} {best:8.3f} {statistics.median(times):9.3f} "
            f"{size / best / 1e9:6.2f} {ref / best:14.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
