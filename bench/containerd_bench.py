"""containerd with our snapshotter (+ differ) against its overlayfs snapshotter, in one run.

    python -m bench.containerd_bench [--repeat N] [--rpc-calls N]

1. Import: a Debian bookworm minbase image (one gzip layer, from bench.convert_bench's cache)
   with `ctr images import` into containerd 2.1 (Debian sid, via
   shim_integration.testbed.containerd_dist):
   overlayfs (walking differ), erofs-py with our differ, erofs-py converting on Commit, and
   as the anchor containerd 2.1's own erofs snapshotter with its erofs differ (`mkfs.erofs
   --tar=f`) and with the walking differ (mkfs.erofs of the directory on Commit), both running
   erofs-utils 1.8 from tests.support.erofs_utils_oracle (its bin dir first in the daemon's PATH).
   Best of N; content, image and snapshots are removed between runs.
2. RPC latency of our service alone: 8 client threads, each Prepare -> write a small file ->
   Commit -> Stat -> Prepare child -> Mounts; p50/p99 per RPC.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import grpc

from bench.convert_bench import minbase_layer
from shim_integration.testbed.containerd_dist import from_suite
from shim_integration.testbed.containerd_private import SnapshotterProcess, Stack, unmount_under
from shim_integration.testbed.oci_archive import write_archive
from snapshotter.service.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter.service.api.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from tests.support.erofs_utils_oracle import erofs_utils

IMAGE = "example.com/bench/minbase:1"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def minbase_archive(out: Path) -> Path:
    tar_path, gz_path = minbase_layer()
    write_archive([gz_path.read_bytes()], [_sha256_file(tar_path)], IMAGE, out, cmd=["/bin/sh"])
    return out


def time_import(stack: Stack, snapshotter: str, archive: Path, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        stack.containerd.ctr(
            "images", "import", "--snapshotter", snapshotter, str(archive), timeout=600
        )
        best = min(best, time.perf_counter() - t0)
        stack.containerd.ctr("images", "rm", "--sync", IMAGE)
    return best


def start_with_containerd_erofs(stack: Stack, differ: str, mkfs_dir: Path) -> Stack:
    """Start STACK with containerd's own erofs snapshotter unpacking through DIFFER ("erofs":
    mkfs.erofs --tar=f; "walking": unpack, mkfs.erofs of the directory on Commit) and the
    mkfs.erofs in MKFS_DIR first on the daemon's PATH."""
    with open(stack.containerd.config, "a") as f:
        f.write(
            '[[plugins."io.containerd.transfer.v1.local".unpack_config]]\n'
            '  platform = "linux/amd64"\n  snapshotter = "erofs"\n'
            f'  differ = "{differ}"\n'
        )
    stack.service.start()
    path = os.environ.get("PATH", "")
    os.environ["PATH"] = f"{mkfs_dir}:{path}"  # read by Containerd.env() when it starts
    try:
        stack.containerd.start()
    finally:
        os.environ["PATH"] = path
    return stack


def bench_import(base: Path, repeat: int) -> list[tuple[str, float]]:
    archive = minbase_archive(base / "minbase.tar")
    dist = from_suite("sid")
    tools = erofs_utils()
    rows = []
    cases = ((True, ["overlayfs", "erofs-py", "erofs"]), (False, ["erofs-py", "erofs"]))
    for differ, setups in cases:
        stack = start_with_containerd_erofs(
            Stack(dist, base / f"stack-{differ}", differ=differ),
            "erofs" if differ else "walking",
            tools.bin_dir,
        )
        try:
            for sn in setups:
                path = "differ" if differ else "convert on Commit"
                label = sn if sn == "overlayfs" else f"erofs-py ({path})"
                if sn == "erofs":
                    label = (
                        f"containerd's erofs, {'erofs differ' if differ else 'walking'}"
                        f" (mkfs.erofs {tools.upstream_version})"
                    )
                rows.append(
                    (
                        f"containerd {dist.version} import, {label}",
                        time_import(stack, sn, archive, repeat),
                    )
                )
        finally:
            stack.stop()
    return rows


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rpc-calls", type=int, default=25, help="rounds per client")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ctd-bench-") as tmp:
        base = Path(tmp)
        for label, seconds in bench_import(base, args.repeat):
            print(f"{label:80s} {seconds:7.2f} s")
        print(f"\nRPC latency, 8 concurrent clients x {args.rpc_calls} rounds (ms):")
        print(f"{'rpc':20s} {'p50':>8s} {'p99':>8s}")
        for name, p50, p99 in bench_rpc(base, args.rpc_calls):
            print(f"{name:20s} {p50:8.2f} {p99:8.2f}")


if __name__ == "__main__":
    main()
