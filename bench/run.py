"""Every benchmark, one after the other: `make bench` (or `python -m bench.run [NAME...]`).

Each prints the project and its anchor side by side with the ratio; docs/benchmarks.md records
the figures with the command that made them.
"""

from __future__ import annotations

import subprocess
import sys

BENCHMARKS = {
    "convert": ["bench.convert_bench"],
    "oracle": ["bench.oracle_bench"],
    "verity": ["bench.verity_bench"],
    "merge": ["bench.merge_bench"],
    "containerd": ["bench.containerd_bench"],
    "workers": ["bench.workers_bench"],
    "attach": ["bench.attach_bench"],
}


def main(argv: list[str]) -> int:
    names = argv or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}", file=sys.stderr)
        return 2
    failed = []
    for name in names:
        print(f"== {name}", flush=True)
        if subprocess.run([sys.executable, "-m", *BENCHMARKS[name]]).returncode != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
