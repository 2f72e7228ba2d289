"""Layer conversion, ours against erofs-utils 1.8 (Debian trixie's source, built by
tests/support/erofs_utils_oracle.py), in one run.

    python -m bench.oracle_bench [--repeat N] [--no-check] [--only CASE,...]

Cases (rounds alternate between the contenders of a case, so they share the machine's state;
the ratio is the median of the per-round ratios ours / 1.8):
- `tar`: the Debian minbase layer (`bench.convert_bench.minbase_layer()`), ours `convert` of
  the .tar, 1.8 `mkfs.erofs --tar=f --aufs` of the .tar; the image sizes are compared too;
- `gzip-verity`: ours `convert --verity --diff-id D` of the .tar.gz (image, dm-verity tree and
  root hash in one pass), 1.8 `--tar=f --aufs --ungzip` (no verity);
- `zstd`: ours `convert` of the .tar.zst, 1.8 `zstd -dc | mkfs.erofs --tar=f --aufs`;
- `dir`: from an unpacked directory, ours `convert_directory`, 1.8 `mkfs.erofs DIR`
  (directory unpacked once, not timed), and the unpack-then-commit path `tar -xf` + 1.8;
- `wide10k`, `wide40k`: one directory of 10,000 / 40,000 entries
  (`bench.convert_bench.wide_layer()`), ours vs 1.8 `--tar=f --aufs`.

Times are wall clock of whole processes (interpreter start included for ours), input page
cache warm, an untimed `sync` before every run (no run pays for the last one's writeback).
Our processes run with bytecode caches (an installed package has them; the environment's
PYTHONDONTWRITEBYTECODE is dropped for them and the sources are compiled once first). Ours
includes the fsync and rename of its output (`atomic_output`); mkfs.erofs does not fsync.
Unless --no-check, the minbase images of both are mounted once and compared entry by entry
(mtimes to the second: 1.8 misreads GNU tar's short PAX fractions, see
tests/kernel/test_erofs_oracle.py).
"""

from __future__ import annotations

import argparse
import compileall
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.convert_bench import CACHE, CLI, OURS_ENV, minbase_layer, minbase_zstd, wide_layer
from bench.host import describe
from tests.support.erofs_utils_oracle import ErofsUtils, build_info, erofs_utils


@dataclass
class Timing:
    label: str
    times: list[float] = field(default_factory=list)

    @property
    def best(self) -> float:
        return min(self.times)

    @property
    def median(self) -> float:
        return statistics.median(self.times)


REPO = Path(__file__).resolve().parent.parent


def run(cmd: list[str], cwd: Path | None = None) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=OURS_ENV, cwd=cwd)


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def shell(cmd: str) -> None:
    subprocess.run(["bash", "-o", "pipefail", "-c", cmd], check=True, stdout=subprocess.DEVNULL)


def timed_rounds(
    repeat: int, contenders: list[tuple[str, Callable[[], None], Callable[[], None] | None]]
) -> list[Timing]:
    """Each round runs every contender once (cleanup untimed before each run)."""
    timings = [Timing(label) for label, _, _ in contenders]
    for _ in range(repeat):
        for timing, (_, job, clean) in zip(timings, contenders, strict=True):
            if clean is not None:
                clean()
            os.sync()
            started = time.perf_counter()
            job()
            timing.times.append(time.perf_counter() - started)
    return timings


def check_same_tree(ours: Path, theirs: Path) -> str:
    from tests.support.helpers import mounted_erofs
    from tests.support.treecompare import diff_views, hardlink_groups, tree_view

    with mounted_erofs(ours) as mo, mounted_erofs(theirs) as mt:
        vo, vt = tree_view(mo), tree_view(mt)
        short_fraction = sum(1 for p in vo.keys() & vt.keys() if vo[p].mtime_ns != vt[p].mtime_ns)
        vo, vt = tree_view(mo, mtimes=False), tree_view(mt, mtimes=False)
        problems = diff_views(vo, vt)
        same_seconds = all(
            int(mo.joinpath(p).lstat().st_mtime) == int(mt.joinpath(p).lstat().st_mtime) for p in vo
        )
        if problems or not same_seconds or hardlink_groups(mo) != hardlink_groups(mt):
            raise SystemExit("images differ:\n" + "\n".join(problems[:20]))
    return (
        f"same tree ({len(vo)} entries; {short_fraction} mtimes differ below the second "
        "only: 1.8's PAX fraction bug)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-check", action="store_true")
    parser.add_argument("--only", default="tar,gzip-verity,zstd,dir,wide10k,wide40k")
    parser.add_argument(
        "--durable",
        action="store_true",
        help="time 1.8 with an fsync of its image, as durable as ours (which fsyncs)",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        help="also run `convert` from this checkout (e.g. the main branch), same rounds",
    )
    args = parser.parse_args(argv)
    only = set(args.only.split(","))
    tools: ErofsUtils = erofs_utils()
    tar_path, gz_path = minbase_layer()
    zst_path = minbase_zstd()
    for package in ("snapshotter", "shim_integration", "passthrough"):
        compileall.compile_dir(REPO / package, quiet=1)
    print(f"erofs-utils {tools.version} ({tools.bin_dir}); build {build_info(tools)}")
    print(describe())
    print(f"load before: {os.getloadavg()}")
    mkfs = [tools.mkfs, "--quiet"]
    rows: list[tuple[str, list[Timing]]] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        work = Path(tmp)
        ours_out, theirs_out = work / "ours.erofs", work / "theirs.erofs"
        unpacked = work / "unpacked"

        def rm(path: Path) -> Callable[[], None]:
            return lambda: path.unlink(missing_ok=True)

        Contender = tuple[str, Callable[[], None], Callable[[], None]]
        base_out = work / "baseline.erofs"

        def convert(layer: Path, *extra: str) -> Contender:
            label = " ".join(["ours: convert", layer.name.split(".", 1)[1], *extra[:1]])
            return (
                label,
                lambda: run([*CLI, "convert", str(layer), str(ours_out), *extra]),
                rm(ours_out),
            )

        def baseline(layer: Path, *extra: str) -> list[Contender]:
            if args.baseline is None:
                return []
            cmd = [*CLI, "convert", str(layer), str(base_out), *extra]
            label = f"baseline ({args.baseline.name}): convert"
            return [(label, lambda: run(cmd, cwd=args.baseline), rm(base_out))]

        def durable(job: Callable[[], None]) -> Callable[[], None]:
            if not args.durable:
                return job
            return lambda: (job(), fsync(theirs_out))[0]

        def mkfs_tar(layer: Path, *extra: str) -> Contender:
            cmd = [*mkfs, "--tar=f", "--aufs", *extra, str(theirs_out), str(layer)]
            label = " ".join(["1.8: mkfs.erofs --tar=f --aufs", *extra])
            if args.durable:
                label += " + fsync"
            return label, durable(lambda: run(cmd)), rm(theirs_out)

        def unpack() -> None:
            shutil.rmtree(unpacked, ignore_errors=True)
            unpacked.mkdir()
            run(
                [
                    "tar",
                    "--numeric-owner",
                    "--xattrs",
                    "--xattrs-include=*",
                    "-xf",
                    str(tar_path),
                    "-C",
                    str(unpacked),
                ]
            )

        def unpack_then_mkfs() -> None:
            unpack()
            run([*mkfs, str(theirs_out), str(unpacked)])

        if "tar" in only:
            rows.append(
                (
                    "minbase .tar",
                    timed_rounds(
                        args.repeat,
                        [convert(tar_path), mkfs_tar(tar_path), *baseline(tar_path)],
                    ),
                )
            )
            ours_size, theirs_size = ours_out.stat().st_size, theirs_out.stat().st_size
            notes.append(
                f"image bytes, minbase .tar: ours {ours_size}, 1.8 {theirs_size}, "
                f"ours/1.8 {ours_size / theirs_size:.3f}"
            )
            if not args.no_check:
                notes.append("minbase .tar: " + check_same_tree(ours_out, theirs_out))
        if "gzip-verity" in only:
            diff_id = "sha256:" + _sha256(tar_path)
            rows.append(
                (
                    "minbase .tar.gz, ours with verity",
                    timed_rounds(
                        args.repeat,
                        [
                            convert(gz_path, "--verity", "--diff-id", diff_id),
                            mkfs_tar(gz_path, "--ungzip"),
                            *baseline(gz_path, "--verity", "--diff-id", diff_id),
                        ],
                    ),
                )
            )
        if "zstd" in only:
            pipe = f"zstd -dc {zst_path} | {' '.join(mkfs)} --tar=f --aufs {theirs_out}"
            rows.append(
                (
                    "minbase .tar.zst",
                    timed_rounds(
                        args.repeat,
                        [
                            convert(zst_path),
                            (
                                "1.8: zstd -dc | mkfs.erofs --tar=f --aufs"
                                + (" + fsync" if args.durable else ""),
                                durable(lambda: shell(pipe)),
                                rm(theirs_out),
                            ),
                            *baseline(zst_path),
                        ],
                    ),
                )
            )
        if "dir" in only:
            unpack()
            rows.append(
                (
                    "minbase from an unpacked directory",
                    timed_rounds(
                        args.repeat,
                        [
                            (
                                "ours: convert_directory(DIR)",
                                lambda: run(
                                    [
                                        sys.executable,
                                        "-c",
                                        "import sys; from snapshotter.ingest.convert import "
                                        "convert_directory as c; c(sys.argv[1], sys.argv[2])",
                                        str(unpacked),
                                        str(ours_out),
                                    ]
                                ),
                                rm(ours_out),
                            ),
                            (
                                "1.8: mkfs.erofs OUT DIR",
                                lambda: run([*mkfs, str(theirs_out), str(unpacked)]),
                                rm(theirs_out),
                            ),
                        ],
                    ),
                )
            )
            rows.append(
                (
                    "minbase unpack-then-commit",
                    timed_rounds(
                        max(1, args.repeat // 2),
                        [("1.8: tar -xf + mkfs.erofs OUT DIR", unpack_then_mkfs, rm(theirs_out))],
                    ),
                )
            )
            shutil.rmtree(unpacked)
        for name, entries in (("wide10k", 10_000), ("wide40k", 40_000)):
            if name in only:
                wide = wide_layer(entries)
                repeat = args.repeat if entries <= 10_000 else max(1, args.repeat // 2)
                rows.append(
                    (
                        f"one directory of {entries // 1000}k entries",
                        timed_rounds(repeat, [convert(wide), mkfs_tar(wide), *baseline(wide)]),
                    )
                )
    print(f"load after: {os.getloadavg()}")
    print(f"\n{'case':36} {'contender':48} {'best s':>8} {'median s':>9} {'ours/1.8':>9}")
    print("(ours/1.8: the median of the per-round ratios, ours' time / this contender's)")
    for case, timings in rows:
        mine = timings[0] if timings[0].label.startswith("ours") else None
        for t in timings:
            ratio = ""
            if mine is not None and t is not mine:
                per_round = [a / b for a, b in zip(mine.times, t.times, strict=True)]
                ratio = f"{statistics.median(per_round):9.2f}"
            print(f"{case:36} {t.label:48} {t.best:8.3f} {t.median:9.3f} {ratio:>9}")
    for note in notes:
        print(note)
    return 0


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


if __name__ == "__main__":
    sys.exit(main())
