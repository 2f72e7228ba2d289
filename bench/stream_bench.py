"""Where a compressed conversion's threads spend their time (snapshotter/ingest/streams.py).

    python -m bench.stream_bench [--rounds N] [--baseline CHECKOUT] [--switch S] [--verity]

Converts the minbase `.tar.zst` (`--gzip`: the `.tar.gz`) in a child process per round and
reports, per thread, from the kernel's `/proc/thread-self/schedstat` and the stream's own
queue: the wall time, the CPU time, the run-queue delay (runnable but no free CPU: the
machine's other load), the time the parser waited on the producer's queue (and the producer
on the parser's), and what is left, which for these two threads is waiting for the GIL; for
the digests' thread (`layer-diffid`, both sha256s) its CPU, run-queue delay and the rest
("idle": waiting for chunks or the GIL).
`--baseline DIR` runs the same in DIR's checkout (e.g. `git archive main`) in the same rounds;
`--switch S` sets `sys.setswitchinterval(S)` first; `--drain` reads the stream without
parsing (the producer alone). Medians over the rounds.
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

from bench.convert_bench import minbase_layer, minbase_zstd
from bench.host import describe

_CHILD = r"""
import json, sys, time
import snapshotter.ingest.streams as S
from snapshotter.ingest.convert import convert_layer

layer, out, switch, verity, drain = sys.argv[1:6]
if switch != "-":
    sys.setswitchinterval(float(switch))


def sched():
    with open("/proc/thread-self/schedstat") as f:
        cpu, delay = f.read().split()[:2]
    return int(cpu) / 1e9, int(delay) / 1e9


# BODY (a thread's whole run) timed by the kernel's counters into RECORD.
def thread_timed(body, record):

    def timed(self, *args):
        t0, (c0, d0) = time.perf_counter(), sched()
        try:
            body(self, *args)
        finally:
            c1, d1 = sched()
            record.update(wall=time.perf_counter() - t0, cpu=c1 - c0, runq=d1 - d0)

    return timed


# CALL (a queue operation) with the time it blocks added to waits[KEY].
def wait_timed(call, key):

    def timed(self, *args):
        t0 = time.perf_counter()
        try:
            return call(self, *args)
        finally:
            waits[key] += time.perf_counter() - t0

    return timed


waits = {"get": 0.0, "put": 0.0}
producer = {}
digests = {"wall": 0.0, "cpu": 0.0, "runq": 0.0}  # stays 0 where the thread does not exist
LS = S.LayerStream
if hasattr(LS, "_hash_chunks"):
    LS._hash_chunks = thread_timed(LS._hash_chunks, digests)
LS._produce = thread_timed(LS._produce, producer)
LS._put, LS._next_chunk = wait_timed(LS._put, "put"), wait_timed(LS._next_chunk, "get")
t0, (c0, d0) = time.perf_counter(), sched()
if drain == "1":
    with open(layer, "rb") as f, S.LayerStream(f) as stream:
        stream.drain()
else:
    convert_layer(layer, out, verity=verity == "1" or None)
wall, (c1, d1) = time.perf_counter() - t0, sched()
p = producer
print(json.dumps({
    "wall": wall,
    "parser cpu": c1 - c0,
    "parser runq": d1 - d0,
    "parser queue wait": waits["get"],
    "parser GIL wait": wall - (c1 - c0) - (d1 - d0) - waits["get"],
    "producer cpu": p["cpu"],
    "producer runq": p["runq"],
    "producer queue wait": waits["put"],
    "producer GIL wait": p["wall"] - p["cpu"] - p["runq"] - waits["put"],
    "digests cpu": digests["cpu"],
    "digests runq": digests["runq"],
    "digests idle": digests["wall"] - digests["cpu"] - digests["runq"],
}))
"""


def _round(checkout: Path, layer: Path, out: Path, args: argparse.Namespace) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPATH"] = str(checkout)
    flags = [str(layer), str(out), args.switch or "-", "1" if args.verity else "0"]
    flags.append("1" if args.drain else "0")
    got = subprocess.run(
        [sys.executable, "-c", _CHILD, *flags],
        check=True,
        capture_output=True,
        text=True,
        env=env,
        cwd=checkout,
    )
    out.unlink(missing_ok=True)
    result: dict[str, float] = json.loads(got.stdout)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--baseline", type=Path)
    parser.add_argument("--switch", help="sys.setswitchinterval in seconds")
    parser.add_argument("--verity", action="store_true")
    parser.add_argument("--gzip", action="store_true", help="the .tar.gz, not the .tar.zst")
    parser.add_argument("--drain", action="store_true", help="read the stream, no parsing")
    args = parser.parse_args(argv)
    layer = minbase_layer()[1] if args.gzip else minbase_zstd()
    here = Path(__file__).resolve().parents[1]
    checkouts = {"ours": here} | ({"baseline": args.baseline} if args.baseline else {})
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in checkouts}
    print(describe())
    print(f"{layer.name}; load before: {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for name, checkout in checkouts.items():
                runs[name].append(_round(checkout, layer, Path(tmp) / "out.erofs", args))
                time.sleep(0.2)
    print(f"load after: {os.getloadavg()}; medians of {args.rounds} rounds, seconds")
    keys = list(runs["ours"][0])
    print(f"{'':22}" + "".join(f"{name:>12}" for name in runs))
    for key in keys:
        row = [statistics.median(r[key] for r in rs) for rs in runs.values()]
        print(f"{key:22}" + "".join(f"{v:12.3f}" for v in row))
    if args.baseline:
        ratios = [
            o["wall"] / b["wall"] for o, b in zip(runs["ours"], runs["baseline"], strict=True)
        ]
        print(f"wall ours / baseline, median of per-round ratios: {statistics.median(ratios):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
