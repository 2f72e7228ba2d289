"""containerd imports through erofs-py against containerd's own snapshotters, interleaved.

    python -m bench.containerd_bench [--rounds N] [--versions 2.1,1.6] [--rpc-calls N]

Run as root, under `flock /tmp/ep-heavy.lock` (it drops the page cache and owns the private
containerds' names). The image: Debian bookworm minbase as one layer (bench.convert_bench's
cache), once as tar+gzip and once as tar+zstd (`zstd -3` of the same tar: the same diffID).

- containerd 2.1 (Debian sid, shim_integration.testbed.containerd_dist), one daemon for all
  of: `overlayfs` (walking differ), `erofs-py` (our snapshotter + our differ: layer.erofs and
  its dm-verity tree in one pass) and containerd's own `erofs` snapshotter + `erofs` differ
  (`mkfs.erofs --tar=f`, no verity), running erofs-utils 1.8 from
  tests.support.erofs_utils_oracle (its bin dir first in the daemon's PATH).
- containerd 1.6 (Debian bookworm's /usr/bin/containerd), one daemon: `overlayfs` and
  `erofs-py` (no diff proxies on 1.6: the walking differ unpacks, our Commit converts).

Our service runs as `serve` does by default (conversion workers, one per CPU) plus
`containerd_content` naming the private containerd's content store, so the differ hands
the blob file to its worker. Before each import the bench waits until our Commits' retired
uppers are removed (a background job, not on Commit's path), so no run pays for another.

Each round also times `ingest`: `ctr images import --no-unpack`, containerd's own part of
every import (reading the archive into its content store; no snapshotter, no differ), so the
report can give each snapshotter's unpack alone (import - ingest) and the floor no snapshotter's
ratio can go below (ingest / the anchor's import).

Every import is `ctr images import --snapshotter S` after `sync` and
`echo 3 > /proc/sys/vm/drop_caches`, followed by `sync` (timed apart: "durable" is the import
plus the writeback of whatever it left dirty, as the oracle bench's `--durable` charges
mkfs.erofs an fsync; our layer store fsyncs each blob before Commit, containerd's erofs
differ runs mkfs.erofs, which does not) and `ctr images rm --sync` (content, image and
snapshots go). Rounds interleave the snapshotters, their order rotating each round, and the
two compressions; the report gives each case's median and the ratios erofs-py / anchor, both
of the medians and the median of the per-round ratios.

Then (unless `--rpc-calls 0`) the RPC latency of our service alone: 8 client threads, each
Prepare -> write a small file -> Commit -> Stat -> Prepare child -> Mounts; p50/p99 per RPC.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import grpc

from bench.convert_bench import minbase_layer
from bench.host import describe
from shim_integration.testbed.containerd_dist import from_suite
from shim_integration.testbed.containerd_private import (
    Dist,
    SnapshotterProcess,
    Stack,
    system_dist,
    unmount_under,
)
from shim_integration.testbed.oci_archive import write_archive
from snapshotter.service.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter.service.api.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from tests.support.erofs_utils_oracle import erofs_utils

MEDIA = {
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}
OURS = "erofs-py"
INGEST = "ingest"  # content only: `ctr images import --no-unpack`


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def archives(base: Path) -> dict[str, tuple[Path, str]]:
    """compression -> (OCI archive of the minbase image, its image name)."""
    tar_path, gz_path = minbase_layer()
    zst_path = tar_path.with_name(tar_path.name + ".zst")
    if not zst_path.exists():
        tmp = zst_path.with_name(zst_path.name + ".tmp")
        subprocess.run(["zstd", "-q", "-f", "-3", str(tar_path), "-o", str(tmp)], check=True)
        os.rename(tmp, zst_path)
    diff_id = _sha256_file(tar_path)
    out = {}
    for comp, layer in (("gzip", gz_path), ("zstd", zst_path)):
        name = f"example.com/bench/minbase-{comp}:1"
        archive = base / f"minbase-{comp}.tar"
        write_archive(
            [layer.read_bytes()],
            [diff_id],
            name,
            archive,
            cmd=["/bin/sh"],
            layer_media_type=MEDIA[comp],
        )
        out[comp] = (archive, name)
    return out


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def wait_retired_uppers(stack: Stack, timeout: float = 300) -> None:
    """Our Commit removes the unpacked upper (fs.old-*) in the background: let it finish
    before the next import, so no run pays for an earlier one."""
    deadline = time.monotonic() + timeout
    snapshots = stack.service.root / "snapshots"
    while any(snapshots.glob("*/fs.old-*")) and time.monotonic() < deadline:
        time.sleep(0.05)


def time_import(stack: Stack, snapshotter: str, archive: Path, image: str) -> tuple[float, float]:
    """Seconds of the import, and of the import plus a `sync` right after it."""
    wait_retired_uppers(stack)
    drop_caches()
    how = ["--no-unpack"] if snapshotter == INGEST else ["--snapshotter", snapshotter]
    t0 = time.perf_counter()
    stack.containerd.ctr("images", "import", *how, str(archive), timeout=900)
    seconds = time.perf_counter() - t0
    os.sync()
    durable = time.perf_counter() - t0
    stack.containerd.ctr("images", "rm", "--sync", image)
    return seconds, durable


def start_stack(dist: Dist, base: Path, erofs_bin: Path | None) -> Stack:
    """One daemon for every snapshotter of DIST: our differ on 1.7+ (with containerd's erofs
    snapshotter + differ beside it on 2.x, mkfs.erofs from EROFS_BIN first on its PATH)."""
    config = base / "serve.toml"
    base.mkdir(parents=True, exist_ok=True)
    # the differ hands the blob file to its worker (serve_config's containerd_content)
    content = base / "containerd" / "root" / "io.containerd.content.v1.content"
    config.write_text(f'containerd_content = "{content}"\n')
    stack = Stack(dist, base, differ=dist.has_diff_proxies, service_args=["--config", str(config)])
    if erofs_bin is not None:
        with open(stack.containerd.config, "a") as f:
            f.write(
                '[[plugins."io.containerd.transfer.v1.local".unpack_config]]\n'
                '  platform = "linux/amd64"\n  snapshotter = "erofs"\n  differ = "erofs"\n'
            )
    stack.service.start()
    path = os.environ.get("PATH", "")
    if erofs_bin is not None:
        os.environ["PATH"] = f"{erofs_bin}:{path}"  # read by Containerd.env() when it starts
    try:
        stack.containerd.start()
    except BaseException:
        stack.stop()
        raise
    finally:
        os.environ["PATH"] = path
    return stack


Times = dict[tuple[str, str], list[float]]


def bench_version(
    dist: Dist, base: Path, imgs: dict[str, tuple[Path, str]], rounds: int
) -> tuple[Times, Times]:
    """(compression, snapshotter) -> seconds per round, all in one daemon: of the imports,
    and of the imports each followed by `sync`."""
    erofs_bin = erofs_utils().bin_dir if dist.major_minor >= (2, 0) else None
    setups = ["overlayfs", OURS] + (["erofs"] if erofs_bin else []) + [INGEST]
    stack = start_stack(dist, base / f"stack-{dist.version}", erofs_bin)
    times: Times = defaultdict(list)
    durable: Times = defaultdict(list)
    try:
        for archive, image in imgs.values():  # warm-up: binaries, the first GC
            time_import(stack, OURS, archive, image)
        for r in range(rounds):
            order = setups[r % len(setups) :] + setups[: r % len(setups)]
            comps = list(imgs) if r % 2 == 0 else list(reversed(imgs))
            for comp in comps:
                archive, image = imgs[comp]
                for sn in order:
                    seconds, synced = time_import(stack, sn, archive, image)
                    times[comp, sn].append(seconds)
                    durable[comp, sn].append(synced)
                    line = f"  round {r + 1} {dist.version} {comp} {sn}: {seconds:.2f} s"
                    print(line + f" ({synced:.2f} s with the sync after it)", flush=True)
    finally:
        stack.stop()
    return times, durable


def report(version: str, times: Times, what: str = "import") -> None:
    rounds = len(next(iter(times.values())))
    print(f"\ncontainerd {version}: {what} of minbase, median of {rounds}")
    print(f"{'layer':6s} {'snapshotter':12s} {'median s':>9s} {'runs':s}")
    for (comp, sn), values in sorted(times.items()):
        runs = " ".join(f"{v:.2f}" for v in values)
        print(f"{comp:6s} {sn:12s} {statistics.median(values):9.2f} {runs}")
    for comp in sorted({c for c, _ in times}):
        ours = times[comp, OURS]
        for anchor in ("erofs", "overlayfs"):
            theirs = times.get((comp, anchor))
            if not theirs:
                continue
            of_medians = statistics.median(ours) / statistics.median(theirs)
            per_round = statistics.median(o / t for o, t in zip(ours, theirs, strict=True))
            print(
                f"{comp:6s} {OURS} / {anchor}: {of_medians:.2f} (ratio of medians), "
                f"{per_round:.2f} (median of per-round ratios)"
            )
        ingest = times.get((comp, INGEST))
        if not ingest:
            continue
        floor = statistics.median(ingest)
        unpack = {
            sn: statistics.median(values) - floor
            for (c, sn), values in sorted(times.items())
            if c == comp and sn != INGEST
        }
        print(
            f"{comp:6s} containerd's ingest alone {floor:.2f} s = "
            f"{floor / statistics.median(times[comp, 'overlayfs']):.2f} of overlayfs's import "
            "(the floor of any snapshotter's ratio to it); unpack alone (median import - "
            "ingest): " + ", ".join(f"{sn} {sec:.2f} s" for sn, sec in unpack.items())
        )


def _client(
    stub: pb_grpc.SnapshotsStub,
    n: int,
    worker: int,
    lat: dict[str, list[float]],
    lock: threading.Lock,
) -> None:
    def timed(name: str, call, request):
        t0 = time.perf_counter()
        reply = call(request)
        with lock:
            lat[name].append(time.perf_counter() - t0)
        return reply

    for i in range(n):
        key = f"bench/{worker}/a{i}"
        mounts = timed("Prepare", stub.Prepare, pb.PrepareSnapshotRequest(key=key)).mounts
        Path(mounts[0].source, "f").write_bytes(b"x" * 4096)
        timed("Commit", stub.Commit, pb.CommitSnapshotRequest(key=key, name=key + "-c"))
        timed("Stat", stub.Stat, pb.StatSnapshotRequest(key=key + "-c"))
        child = f"bench/{worker}/b{i}"
        timed(
            "Prepare (child)", stub.Prepare, pb.PrepareSnapshotRequest(key=child, parent=key + "-c")
        )
        timed("Mounts", stub.Mounts, pb.MountsRequest(key=child))


def bench_rpc(base: Path, calls: int, clients: int = 8) -> list[tuple[str, float, float]]:
    service = SnapshotterProcess(base / "rpc-root", base / "rpc.sock", base / "rpc.log").start()
    lat: dict[str, list[float]] = {
        k: [] for k in ("Prepare", "Commit", "Stat", "Prepare (child)", "Mounts")
    }
    lock = threading.Lock()
    try:
        with grpc.insecure_channel(f"unix:{service.socket}") as ch:
            stub = pb_grpc.SnapshotsStub(ch)
            threads = [
                threading.Thread(target=_client, args=(stub, calls, w, lat, lock))
                for w in range(clients)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    finally:
        service.stop()
        unmount_under(base)
    rows = []
    for name, values in lat.items():
        q = statistics.quantiles(values, n=100)
        rows.append((name, q[49] * 1000, q[98] * 1000))
    return rows


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--versions", default="2.1,1.6", help="comma-separated: 2.1, 1.6")
    parser.add_argument("--rpc-calls", type=int, default=0, help="rounds per client (0: skip)")
    args = parser.parse_args()
    dists = {"2.1": lambda: from_suite("sid"), "1.6": system_dist}
    print(describe())
    with tempfile.TemporaryDirectory(prefix="ctd-bench-") as tmp:
        base = Path(tmp)
        imgs = archives(base)
        for v in args.versions.split(","):
            dist = dists[v]()
            print(f"containerd {dist.version}, load before {_load()}", flush=True)
            times, durable = bench_version(dist, base, imgs, args.rounds)
            print(f"load after {_load()}")
            report(dist.version, times)
            report(dist.version, durable, "import + sync")
        if args.rpc_calls:
            print(f"\nRPC latency, 8 concurrent clients x {args.rpc_calls} rounds (ms):")
            print(f"{'rpc':20s} {'p50':>8s} {'p99':>8s}")
            for name, p50, p99 in bench_rpc(base, args.rpc_calls):
                print(f"{name:20s} {p50:8.2f} {p99:8.2f}")


if __name__ == "__main__":
    main()
