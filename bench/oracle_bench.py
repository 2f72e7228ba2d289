"""Layer conversion, ours against erofs-utils 1.8 (Debian trixie's source, built by
tests/support/erofs_utils_oracle.py), in one run.

    python -m bench.oracle_bench [--repeat N] [--no-check]

Cases (rounds alternate between the contenders of a case, so they share the machine's state):
- the Debian minbase layer (`bench.convert_bench.minbase_layer()`):
  ours `convert` of the .tar, 1.8 `mkfs.erofs --tar=f --aufs` of the .tar;
  ours `convert` of the .tar.gz, 1.8 `--tar=f --aufs --ungzip` of the .tar.gz;
  from an unpacked directory: ours `convert_directory`, 1.8 `mkfs.erofs DIR` (directory already
  unpacked, not timed), and the unpack-then-commit path `tar -xf` + 1.8 `mkfs.erofs DIR`;
- one directory of 40,000 entries (`bench.convert_bench.wide_layer()`): ours vs 1.8 `--tar=f`.

Times are wall clock of whole processes (interpreter start included for ours), page
cache warm; best and median of N. Unless --no-check, the minbase images of both are mounted
once and compared entry by entry (mtimes to the second: 1.8 misreads GNU tar's short PAX
fractions, see tests/kernel/test_erofs_oracle.py).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.convert_bench import CACHE, CLI, minbase_layer, wide_layer
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


def run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def timed_rounds(
    repeat: int, contenders: list[tuple[str, Callable[[], None], Callable[[], None] | None]]
) -> list[Timing]:
    """Each round runs every contender once (cleanup untimed before each run)."""
    timings = [Timing(label) for label, _, _ in contenders]
    for _ in range(repeat):
        for timing, (_, job, clean) in zip(timings, contenders, strict=True):
            if clean is not None:
                clean()
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
    args = parser.parse_args(argv)
    tools: ErofsUtils = erofs_utils()
    tar_path, gz_path = minbase_layer()
    wide = wide_layer()
    print(f"erofs-utils {tools.version} ({tools.bin_dir}); build {build_info(tools)}")
    mkfs = [tools.mkfs, "--quiet"]
    rows: list[tuple[str, list[Timing]]] = []
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        work = Path(tmp)
        ours_out, theirs_out = work / "ours.erofs", work / "theirs.erofs"
        unpacked = work / "unpacked"

        def rm(path: Path) -> Callable[[], None]:
            return lambda: path.unlink(missing_ok=True)

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

        rows.append(
            (
                "minbase .tar",
                timed_rounds(
                    args.repeat,
                    [
                        (
                            "ours: convert .tar",
                            lambda: run([*CLI, "convert", str(tar_path), str(ours_out)]),
                            rm(ours_out),
                        ),
                        (
                            "1.8: mkfs.erofs --tar=f --aufs",
                            lambda: run(
                                [*mkfs, "--tar=f", "--aufs", str(theirs_out), str(tar_path)]
                            ),
                            rm(theirs_out),
                        ),
                    ],
                ),
            )
        )
        check = "" if args.no_check else check_same_tree(ours_out, theirs_out)
        rows.append(
            (
                "minbase .tar.gz",
                timed_rounds(
                    args.repeat,
                    [
                        (
                            "ours: convert .tar.gz",
                            lambda: run([*CLI, "convert", str(gz_path), str(ours_out)]),
                            rm(ours_out),
                        ),
                        (
                            "1.8: mkfs.erofs --tar=f --aufs --ungzip",
                            lambda: run(
                                [
                                    *mkfs,
                                    "--tar=f",
                                    "--aufs",
                                    "--ungzip",
                                    str(theirs_out),
                                    str(gz_path),
                                ]
                            ),
                            rm(theirs_out),
                        ),
                    ],
                ),
            )
        )
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
                    [
                        ("1.8: tar -xf + mkfs.erofs OUT DIR", unpack_then_mkfs, rm(theirs_out)),
                    ],
                ),
            )
        )
        shutil.rmtree(unpacked)
        rows.append(
            (
                "one directory of 40k entries",
                timed_rounds(
                    max(1, args.repeat // 2),
                    [
                        (
                            "ours: convert .tar",
                            lambda: run([*CLI, "convert", str(wide), str(ours_out)]),
                            rm(ours_out),
                        ),
                        (
                            "1.8: mkfs.erofs --tar=f --aufs",
                            lambda: run([*mkfs, "--tar=f", "--aufs", str(theirs_out), str(wide)]),
                            rm(theirs_out),
                        ),
                    ],
                ),
            )
        )

    ref = rows[0][1][0].best  # ours, minbase .tar: what a case without ours compares to
    print(f"\n{'case':36} {'contender':44} {'best s':>8} {'median s':>9} {'ours/this':>10}")
    print("(ours/this: ours' best in the same case, or ours .tar's where a case has no ours)")
    for case, timings in rows:
        mine = timings[0].best if timings[0].label.startswith("ours") else ref
        for t in timings:
            ratio = "" if t.label.startswith("ours") else f"{mine / t.best:10.2f}"
            print(f"{case:36} {t.label:44} {t.best:8.3f} {t.median:9.3f} {ratio:>10}")
    if check:
        print("\nminbase .tar:", check)
    return 0


if __name__ == "__main__":
    sys.exit(main())
