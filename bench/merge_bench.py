"""fsmeta merge time and peak memory by layer and file count, erofs-utils' rebuild mode as the
anchor, both run as whole processes in interleaved rounds.

    python -m bench.merge_bench [--rounds 5] [--rss] [--incremental] [--cases 10000x1,...]

Layers: a base layer of N files (100 per directory) plus L-1 small layers that each add one
file and white out another, written without inline data (erofs-utils' rebuild mode refuses
inline data, "unsupported datalayout 2"), so both sides merge the same blobs.

Each round runs ours, then the anchor (alternating which goes first), each in its own process:
ours is `merge_layers` as the snapshotter calls it, in a fresh interpreter that reports the
merge's own time (imports and interpreter start excluded: `merge s`) while the round also
takes the whole process's wall time (`proc s`); the anchor is erofs-utils >= 1.8
`mkfs.erofs --ovlfs-strip=1 OUT LAYER...` (built by tests/support/erofs_utils_oracle.py and
cached under ~/.cache/erofs-passthrough/erofs-utils/). Peak RSS of each process comes from
GNU time (`/usr/bin/time -f %M`). Medians over the rounds; ratios are ours / anchor. `--rss`
adds the 500k-file case; `--incremental` also times ours continuing from the fsmeta of every
layer but the top (what VM mode does for a chain whose parent chain is published). The
layers sit in the page cache (built just before): the merge reads metadata only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.convert_bench import CACHE
from bench.host import describe
from snapshotter.fsmeta.merge import merge_layers
from snapshotter.ingest.convert import convert_layer
from tests.support.layers import Entry, write_tar

CASES = [(10_000, 1), (10_000, 10), (10_000, 100), (10_000, 500), (100_000, 1), (100_000, 128)]
RSS_CASE = (500_000, 1)
TIME = "/usr/bin/time"  # GNU time, for a child's own peak RSS

# The child that runs our merge: prints its own merge time.
_OURS = """
import json, sys, time
from pathlib import Path
from snapshotter.fsmeta.merge import merge_layers
layers = [Path(p) for p in json.loads(sys.argv[2])]
parent = sys.argv[3] if len(sys.argv) > 3 else None
t = time.perf_counter()
result = merge_layers(layers, sys.argv[1], parent=parent)
print(json.dumps({"merge": time.perf_counter() - t, "size": result.size}))
"""


def _mkfs_18() -> Path | None:
    found = sorted((CACHE.parent / "erofs-utils").glob("*/**/mkfs.erofs"))
    return found[-1] if found else None


def build_layers(work: Path, files: int, layers: int) -> list[Path]:
    base = [Entry("./", "dir")]
    for d in range(files // 100):
        base.append(Entry(f"d{d:04d}", "dir"))
        base += [Entry(f"d{d:04d}/f{i:03d}", data=b"x") for i in range(100)]
    specs = [base]
    for n in range(1, layers):
        d = n % max(1, files // 100)
        specs.append(
            [
                Entry(f"d{d:04d}", "dir"),
                Entry(f"d{d:04d}/new{n}", data=b"n"),
                Entry(f"d{d:04d}/.wh.f{n % 100:03d}"),
            ]
        )
    paths = []
    for i, entries in enumerate(specs):
        tar = write_tar(work / f"l{i}.tar", entries)
        out = work / f"l{i}.erofs"
        convert_layer(tar, out, inline_max=0)  # erofs-utils' rebuild cannot merge inline data
        tar.unlink()
        paths.append(out)
    return paths


def _run(argv: list[str]) -> tuple[float, int, str]:
    """Wall seconds, peak RSS in KiB and stdout of one whole process.

    The peak comes from GNU time (`/usr/bin/time -f %M`), not from wait4 here: a child that
    Python starts with vfork shares this process's memory until it execs, and Linux keeps
    that high-water mark as the child's ru_maxrss, so every child would weigh at least as
    much as this benchmark (which has just built the layers)."""
    with tempfile.NamedTemporaryFile() as out, tempfile.NamedTemporaryFile("r") as rss:
        start = time.perf_counter()
        proc = subprocess.run(
            [TIME, "-f", "%M", "-o", rss.name, *argv], stdout=out, stderr=subprocess.DEVNULL
        )
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed ({proc.returncode})")
        out.seek(0)
        return wall, int(rss.read().split()[-1]), out.read().decode()


def _ours(
    work: Path, paths: list[Path], parent: Path | None = None
) -> tuple[float, float, int, int]:
    argv = [sys.executable, "-c", _OURS, str(work / "m.fsmeta"), json.dumps(list(map(str, paths)))]
    if parent is not None:
        argv.append(str(parent))
    wall, rss, out = _run(argv)
    report = json.loads(out)
    return report["merge"], wall, rss, report["size"]


def _anchor(mkfs: Path, work: Path, paths: list[Path]) -> tuple[float, int]:
    argv = [str(mkfs), "--quiet", "--ovlfs-strip=1", str(work / "a.fsmeta"), *map(str, paths)]
    wall, rss, _ = _run(argv)
    return wall, rss


def measure(
    files: int, layers: int, rounds: int, mkfs: Path | None, incremental: bool
) -> dict[str, float]:
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        work = Path(tmp)
        paths = build_layers(work, files, layers)
        parent = None
        if incremental and layers > 1:  # the parent chain's fsmeta: every layer but the top
            parent = work / "parent.fsmeta"
            merge_layers(paths[:-1], parent)
        ours: list[tuple[float, float, int, int]] = []
        continued: list[tuple[float, float, int, int]] = []
        anchor: list[tuple[float, int]] = []
        for r in range(rounds):
            if mkfs is not None and r % 2:
                anchor.append(_anchor(mkfs, work, paths))
            ours.append(_ours(work, paths))
            if parent is not None:
                continued.append(_ours(work, paths, parent))
            if mkfs is not None and not r % 2:
                anchor.append(_anchor(mkfs, work, paths))
        row = {
            "files": files,
            "layers": layers,
            "merge_s": statistics.median(o[0] for o in ours),
            "proc_s": statistics.median(o[1] for o in ours),
            "rss_mib": max(o[2] for o in ours) / 1024,
            "fsmeta_kib": ours[-1][3] / 1024,
        }
        if continued:
            row["continued_s"] = statistics.median(c[0] for c in continued)
        if anchor:
            row["anchor_s"] = statistics.median(a[0] for a in anchor)
            row["anchor_rss_mib"] = max(a[1] for a in anchor) / 1024
        return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rss", action="store_true", help="add the 500k-file case")
    parser.add_argument("--cases", help="FILESxLAYERS,... instead of the default cases")
    parser.add_argument(
        "--incremental",
        action="store_true",
        help="also time ours continuing from the fsmeta of all layers but the top",
    )
    args = parser.parse_args(argv)
    CACHE.mkdir(parents=True, exist_ok=True)  # convert_bench makes it, but may not have run
    mkfs = _mkfs_18()
    cases = CASES
    if args.cases:
        cases = [tuple(map(int, c.split("x"))) for c in args.cases.split(",")]  # type: ignore[misc]
    if args.rss:
        cases = [*cases, RSS_CASE]
    print(f"anchor: {mkfs or 'none (erofs-utils >= 1.8 not built)'}; rounds: {args.rounds}")
    print(describe())
    print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} at start")
    print(
        "| files | layers | ours merge s | ours proc s | erofs-utils 1.8 s | merge/1.8 | proc/1.8 "
        "| ours RSS MiB | 1.8 RSS MiB | RSS ratio | fsmeta KiB | ours continued s | cont./1.8 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for files, layers in cases:
        row = measure(files, layers, args.rounds, mkfs, args.incremental)
        c = row.get("continued_s")
        a = row.get("anchor_s")
        ar = row.get("anchor_rss_mib")
        cells = [
            f"{files:,}",
            str(layers),
            f"{row['merge_s']:.3f}",
            f"{row['proc_s']:.3f}",
            f"{a:.3f}" if a else "",
            f"{row['merge_s'] / a:.2f}" if a else "",
            f"{row['proc_s'] / a:.2f}" if a else "",
            f"{row['rss_mib']:.0f}",
            f"{ar:.0f}" if ar else "",
            f"{row['rss_mib'] / ar:.2f}" if ar else "",
            f"{row['fsmeta_kib']:.0f}",
            f"{c:.3f}" if c else "",
            f"{c / a:.2f}" if c and a else "",
        ]
        print("| " + " | ".join(cells) + " |", flush=True)
    print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} at end")


if __name__ == "__main__":
    main()
