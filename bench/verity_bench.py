"""dm-verity formatting speed: ours against `veritysetup format`, interleaved in one run.

    python -m bench.verity_bench [--size-mib 1024] [--rounds 5] [--dir DIR] [--cold] [--busy]

Writes a file of random data (default 1 GiB), then alternates, round by round, whole
processes that each build the same tree (separate hash file, sha256, 4096/4096, v1
superblock, the same salt and UUID; root hashes and hash files must be equal):
- `veritysetup format DATA HASH` (the anchor);
- `erofs-passthrough verity format DATA --hash-file HASH` (`python -m shim_integration.cli`,
  the command a user runs: interpreter start and the CLI's imports included), with the
  compiled loop (threads), and with `EROFS_PASSTHROUGH_PURE=1` (the pure-Python loop,
  worker processes);
- `format_file` in a minimal process (`python -c`, importing only `snapshotter.verity`): the
  library's own cost, the same two paths.
And in this process, the streaming builder alone with the compiled loop (`hash_blocks` over
4 MiB chunks already in memory, then `finish`: what the EROFS converter adds to a
conversion pass; one thread).

`--cold`: `sync; echo 3 > /proc/sys/vm/drop_caches` before every run (the data is read from
disk: put --dir on a real disk, not tmpfs); otherwise the file is read once before each run
so every contender hashes from the page cache. `--busy`: a CPU burner process (a Python busy
loop) runs through all rounds, so every contender has one core busy with other work.

Prints, per contender, the median and best time and the median of the per-round ratios
ours / veritysetup (lower is better; <= 1.0 is as fast as veritysetup).

    python -m bench.verity_bench --pools [--size-mib 512] [--busy]

instead compares the ways of hashing a file's leaves (warm, `file_leaf_digests` alone, timed
inside a fresh process per run, interleaved): one thread, two threads, two processes, each
with the compiled loop and with the pure-Python one; this is why the pure loop keeps its
worker processes and the compiled one uses threads.

    python -m bench.verity_bench --memory-gib 100

instead measures the streaming builder's peak RSS for a blob of that size (4 KiB blocks):
leaf digests are fed directly (no data), then `finish` writes the hash area to a temp file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
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

from bench.host import describe
from snapshotter.verity import VerityParams, VerityTreeBuilder, hashing
from snapshotter.verity.params import parse_uuid

SALT = bytes.fromhex("5a" * 32)
UUID = "0b5e6c1a-7d3f-8e42-9a10-5c2d4e6f8a9b"
CHUNK = 4 << 20
ROOT = Path(__file__).resolve().parents[1]

_FORMAT_FILE = (
    "import sys; from snapshotter.verity import VerityParams, format_file; "
    "from snapshotter.verity.params import parse_uuid; "
    "print(format_file(sys.argv[1], hash_path=sys.argv[2], params=VerityParams("
    "salt=bytes.fromhex(sys.argv[3]), uuid=parse_uuid(sys.argv[4]))).root_hash)"
)


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


def _drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def _env(pure: bool) -> dict[str, str]:
    env = {**os.environ, "EROFS_PASSTHROUGH_PURE": "1" if pure else "0"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def _run(cmd: list[str], env: dict[str, str] | None = None) -> tuple[str, float]:
    """(stdout, wall seconds) of one whole process."""
    t = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env, cwd=ROOT)
    return out.stdout, time.perf_counter() - t


def _veritysetup(data: Path, hash_path: Path) -> tuple[str, float]:
    out, seconds = _run(
        [
            "veritysetup",
            "format",
            str(data),
            str(hash_path),
            f"--salt={SALT.hex()}",
            f"--uuid={UUID}",
        ]
    )
    root = next(
        line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Root hash")
    )
    return root, seconds


def _cli(data: Path, hash_path: Path, pure: bool) -> tuple[str, float]:
    out, seconds = _run(
        [
            sys.executable,
            "-m",
            "shim_integration.cli",
            "verity",
            "format",
            str(data),
            f"--hash-file={hash_path}",
            f"--salt={SALT.hex()}",
            f"--uuid={UUID}",
            "--json",
        ],
        _env(pure),
    )
    return json.loads(out)["root_hash"], seconds


def _format_file(data: Path, hash_path: Path, pure: bool) -> tuple[str, float]:
    out, seconds = _run(
        [sys.executable, "-c", _FORMAT_FILE, str(data), str(hash_path), SALT.hex(), UUID],
        _env(pure),
    )
    return out.strip(), seconds


def _streaming(data: Path, hash_path: Path) -> tuple[str, float]:
    """Builder alone, the data already in memory chunk by chunk; returns (root, seconds)."""
    builder = VerityTreeBuilder(VerityParams(salt=SALT, uuid=parse_uuid(UUID)))
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


_POOL_RUN = (
    "import sys, time; from snapshotter.verity.parallel import file_leaf_digests; "
    "path, blocks, workers, pool = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]; "
    "t = time.perf_counter(); "
    "got = sum(len(d) for _, d in file_leaf_digests(path, blocks, 4096, 'sha256', b'salt', "
    "workers=workers, parallel_min_bytes=0, pool=None if pool == '-' else pool)); "
    "assert got == 32 * blocks; print(time.perf_counter() - t)"
)


def _pools(size: int, rounds: int, tmp_dir: str | None, busy: bool) -> int:
    cases = [
        (f"{loop}, {label}", pure, workers, pool)
        for loop, pure in (("compiled loop", False), ("pure Python", True))
        for label, workers, pool in (
            ("one thread", 1, "-"),
            ("2 threads", 2, "threads"),
            ("2 processes", 2, "processes"),
        )
    ]
    runs: dict[str, list[float]] = {name: [] for name, *_ in cases}
    with tempfile.TemporaryDirectory(prefix="verity-bench-", dir=tmp_dir) as tmp:
        data = Path(tmp) / "data"
        _write_random(data, size)
        burner = _burner() if busy else None
        try:
            for _ in range(rounds):
                for name, pure, workers, pool in cases:
                    _warm(data)
                    out, _ = _run(
                        [
                            sys.executable,
                            "-c",
                            _POOL_RUN,
                            str(data),
                            str(size // 4096),
                            str(workers),
                            pool,
                        ],
                        _env(pure),
                    )
                    runs[name].append(float(out))
        finally:
            if burner is not None:
                burner.kill()
                burner.wait()
    load = os.getloadavg()
    print(
        f"leaf hashing of {size >> 20} MiB (sha256, 4096), {rounds} rounds interleaved, warm"
        f"{', one CPU burner running' if busy else ''}; "
        f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    ref = runs[cases[0][0]]
    print(f"{'':32} {'median s':>9} {'best s':>8} {'vs compiled one thread':>23}")
    for name, times in runs.items():
        ratio = statistics.median(t / r for t, r in zip(times, ref, strict=True))
        print(f"{name:32} {statistics.median(times):9.3f} {min(times):8.3f} {ratio:22.2f}x")
    return 0


def _burner() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.verity_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", help="where to put the data file (default: the temp directory)")
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each run")
    ap.add_argument("--busy", action="store_true", help="a CPU burner runs during every run")
    ap.add_argument("--memory-gib", type=int, help="measure peak RSS for a blob this big")
    ap.add_argument("--pools", action="store_true", help="threads vs processes, both loops")
    args = ap.parse_args(argv)
    print(describe())
    if args.dir:
        os.makedirs(args.dir, exist_ok=True)
    if args.memory_gib:
        return _memory(args.memory_gib, args.dir)
    if args.pools:
        return _pools(args.size_mib << 20, args.rounds, args.dir, args.busy)
    if shutil.which("veritysetup") is None:
        print("needs veritysetup (cryptsetup-bin)", file=sys.stderr)
        return 1
    if not hashing.ACCELERATED:
        print("the compiled loop is not built (or EROFS_PASSTHROUGH_PURE is set)", file=sys.stderr)
        return 1
    size = args.size_mib << 20
    anchor = "veritysetup format"
    with tempfile.TemporaryDirectory(prefix="verity-bench-", dir=args.dir) as tmp:
        data = Path(tmp) / "data"
        _write_random(data, size)
        cases: list[tuple[str, Callable[[Path], tuple[str, float]]]] = [
            (anchor, lambda h: _veritysetup(data, h)),
            ("CLI `verity format`, compiled loop", lambda h: _cli(data, h, False)),
            ("CLI `verity format`, pure Python", lambda h: _cli(data, h, True)),
            ("format_file process, compiled loop", lambda h: _format_file(data, h, False)),
            ("format_file process, pure Python", lambda h: _format_file(data, h, True)),
            ("streaming builder, compiled loop", lambda h: _streaming(data, h)),
        ]
        runs: dict[str, list[float]] = {name: [] for name, _ in cases}
        trees: set[tuple[str, bytes]] = set()
        burner = _burner() if args.busy else None
        try:
            for _ in range(args.rounds):
                for name, case in cases:
                    hash_path = Path(tmp) / "hash"
                    hash_path.unlink(missing_ok=True)
                    if args.cold and not name.startswith("streaming"):
                        _drop_caches()
                    else:
                        _warm(data)
                    root, seconds = case(hash_path)
                    trees.add((root, hashlib.sha256(hash_path.read_bytes()).digest()))
                    runs[name].append(seconds)
        finally:
            if burner is not None:
                burner.kill()
                burner.wait()
        if len(trees) != 1:
            print(f"trees differ: {sorted(trees)}", file=sys.stderr)
            return 1
    load = os.getloadavg()
    print(
        f"dm-verity format of {args.size_mib} MiB (sha256, 4096/4096, superblock), "
        f"{args.rounds} rounds interleaved, {len(os.sched_getaffinity(0))} CPUs, "
        f"page cache {'cold' if args.cold else 'warm'}"
        f"{', one CPU burner running' if args.busy else ''}; "
        f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; root {trees.pop()[0]}"
    )
    print(f"{'':38} {'median s':>9} {'best s':>8} {'GB/s':>6} {'ours/veritysetup':>17}")
    for name, times in runs.items():
        ratio = statistics.median(t / a for t, a in zip(times, runs[anchor], strict=True))
        med = statistics.median(times)
        print(
            f"{name:38} {med:9.3f} {min(times):8.3f} {size / med / 1e9:6.2f} {ratio:16.2f}x"
            + ("  (in this process, warm)" if name.startswith("streaming") else "")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
