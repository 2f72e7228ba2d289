"""The service's conversion workers (snapshotter/service/workers.py): start-up cost, two
layers at once against one after the other in one process, and a worker's peak RSS on a
2 GiB layer.

    python -m bench.workers_bench [--rounds N]

1. Start-up: `WorkerPool(n).start()` (fresh interpreters, each importing the converter's
   modules lazily on its first job) for n = 1 and 2, median of N.
2. One minbase `.tar.gz` in this process vs in a worker (what the pipe/descriptor costs), and
   two minbase `.tar.gz` layers (bench.convert_bench's cache), warm cache: converted one after
   the other in this process (what one serving process did) vs handed to a pool of two
   workers at once; rounds interleaved, medians and their ratio.
3. A 2 GiB tar (eight 256 MiB files of non-zero data, generated as it streams) through a pipe
   into one worker: the worker's peak RSS.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tarfile
import tempfile
import threading
import time
from pathlib import Path

from bench.convert_bench import minbase_layer
from snapshotter.erofs.limits import DEFAULT_LIMITS
from snapshotter.ingest.convert import convert_layer
from snapshotter.service.workers import WorkerPool, tar_job


def _request(out: Path) -> dict:
    return tar_job(out, True, DEFAULT_LIMITS)


def startup(rounds: int) -> dict[int, float]:
    result = {}
    for n in (1, 2):
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            pool = WorkerPool(n).start()
            times.append(time.perf_counter() - t0)
            pool.close()
        result[n] = statistics.median(times)
    return result


def serial(layer: Path, tmp: Path) -> float:
    t0 = time.perf_counter()
    for i in range(2):
        convert_layer(str(layer), tmp / f"s{i}.erofs", verity=True, blob_digest=True)
    return time.perf_counter() - t0


def parallel(pool: WorkerPool, layer: Path, tmp: Path) -> float:
    def one(i: int) -> None:
        fd = os.open(layer, os.O_RDONLY)
        try:
            pool.run(_request(tmp / f"p{i}.erofs"), source_fd=fd)
        finally:
            os.close(fd)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def one_in_process(layer: Path, tmp: Path) -> float:
    t0 = time.perf_counter()
    convert_layer(str(layer), tmp / "one-l.erofs", verity=True, blob_digest=True)
    return time.perf_counter() - t0


def one_in_worker(pool: WorkerPool, layer: Path, tmp: Path) -> float:
    fd = os.open(layer, os.O_RDONLY)
    try:
        t0 = time.perf_counter()
        pool.run(_request(tmp / "one-w.erofs"), source_fd=fd)
        return time.perf_counter() - t0
    finally:
        os.close(fd)


def big_layer_rss(tmp: Path) -> int:
    block = random.Random(7).randbytes(1 << 20)
    files, size = 8, 256 << 20

    def write(fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    def feed(fd: int) -> None:
        for i in range(files):
            info = tarfile.TarInfo(f"big/{i}")
            info.size, info.mtime = size, 1
            write(fd, info.tobuf(tarfile.PAX_FORMAT))
            for _ in range(size // len(block)):
                write(fd, block)
        write(fd, b"\0" * 10240)

    pool = WorkerPool(1).start()
    try:
        reply = pool.run(_request(tmp / "big.erofs"), feed=feed)
    finally:
        pool.close()
        (tmp / "big.erofs").unlink(missing_ok=True)
    return reply["maxrss_kib"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print("load", " ".join(Path("/proc/loadavg").read_text().split()[:3]))
    for n, seconds in startup(args.rounds).items():
        print(f"pool start, {n} worker(s): {seconds * 1000:.0f} ms (median of {args.rounds})")
    _, gz = minbase_layer()
    with tempfile.TemporaryDirectory(prefix="workers-bench-") as d:
        tmp = Path(d)
        pool = WorkerPool(2).start()
        s_times, p_times, l_times, w_times = [], [], [], []
        try:
            for r in range(args.rounds):
                if r % 2 == 0:
                    l_times.append(one_in_process(gz, tmp))
                    w_times.append(one_in_worker(pool, gz, tmp))
                else:
                    w_times.append(one_in_worker(pool, gz, tmp))
                    l_times.append(one_in_process(gz, tmp))
                if r % 2 == 0:
                    s_times.append(serial(gz, tmp))
                    p_times.append(parallel(pool, gz, tmp))
                else:
                    p_times.append(parallel(pool, gz, tmp))
                    s_times.append(serial(gz, tmp))
        finally:
            pool.close()
        one_l, one_w = statistics.median(l_times), statistics.median(w_times)
        print(f"one minbase .tar.gz in this process: {one_l:.2f} s, in a worker: {one_w:.2f} s")
        print(f"ratio worker / this process: {one_w / one_l:.2f}")
        s, p = statistics.median(s_times), statistics.median(p_times)
        print(f"two minbase .tar.gz, one process, one after the other: {s:.2f} s (median)")
        print(f"two minbase .tar.gz, two workers at once:              {p:.2f} s (median)")
        print(f"ratio workers / one process: {p / s:.2f}")
        print(f"2 GiB layer, worker peak RSS: {big_layer_rss(tmp) / 1024:.0f} MiB")
    print("load", " ".join(Path("/proc/loadavg").read_text().split()[:3]))


if __name__ == "__main__":
    main()
