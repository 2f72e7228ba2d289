"""fsmeta merge time by layer and file count, with erofs-utils' rebuild mode as the anchor.

    python -m bench.merge_bench

Layers: a base layer of N files (100 per directory) plus L-1 small layers that each add one
file and white out another, written without inline data (erofs-utils' rebuild mode refuses
inline data, "unsupported datalayout 2"), so both sides merge the same blobs.

Ours: `merge_layers`, in process, the way the snapshotter calls it. Anchor: erofs-utils >= 1.8
`mkfs.erofs` rebuild mode over the same layer images, if a build is cached under
~/.cache/erofs-passthrough/erofs-utils/ (tests/support/erofs_utils_oracle.py builds it); otherwise
that column is empty.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from pathlib import Path

from bench.convert_bench import CACHE
from snapshotter.fsmeta.merge import merge_layers
from snapshotter.ingest.convert import convert_layer
from tests.support.layers import Entry, write_tar


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


def main() -> None:
    CACHE.mkdir(parents=True, exist_ok=True)  # convert_bench makes it, but may not have run
    mkfs = _mkfs_18()
    print(f"anchor: {mkfs or 'none (erofs-utils >= 1.8 not built)'}")
    print(
        f"{'files':>7} {'layers':>6} {'ours s':>8} {'anchor s':>9} {'ratio':>6} {'fsmeta KiB':>10}"
    )
    for files, layers in [
        (10_000, 1),
        (10_000, 10),
        (10_000, 100),
        (10_000, 500),
        (100_000, 1),
        (100_000, 128),
    ]:
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            work = Path(tmp)
            paths = build_layers(work, files, layers)
            best = None
            for _ in range(2):
                t = time.perf_counter()
                result = merge_layers(paths, work / "m.fsmeta")
                elapsed = time.perf_counter() - t
                best = elapsed if best is None else min(best, elapsed)
            anchor = None
            if mkfs is not None:
                t = time.perf_counter()
                proc = subprocess.run(
                    [
                        str(mkfs),
                        "--quiet",
                        "--ovlfs-strip=1",
                        str(work / "a.fsmeta"),
                        *map(str, paths),
                    ],
                    capture_output=True,
                )
                anchor = time.perf_counter() - t if proc.returncode == 0 else None
            ratio = f"{best / anchor:6.2f}" if anchor else ""
            anchor_s = f"{anchor:9.3f}" if anchor else ""
            print(
                f"{files:7} {layers:6} {best:8.3f} {anchor_s:>9} {ratio:>6} "
                f"{result.size // 1024:10}"
            )


if __name__ == "__main__":
    main()
