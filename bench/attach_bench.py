"""Attach-to-readable latency per transport, and sequential reads in the guest through
dm-verity vs the raw device, in a TCG guest booted from vm-images/build.

    .venv/bin/python -m bench.attach_bench [--rounds 5] [--size-mib 64] [--json]

Latency: from the QMP attach call until the guest agent has the disk, dm-verity open with the
root hash, the EROFS mounted and one file read (split into attach / visible / verity / mount
/ first read). Throughput: the agent reads a 64 MiB file sequentially after dropping caches,
from the raw disk, from the dm-verity device and through the EROFS mount on dm-verity.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from passthrough.agent_client import AgentClient
from passthrough.attach import TRANSPORTS, Attacher
from passthrough.guest_image import ensure_guest_image
from passthrough.guest_volume import find_disk, open_verity
from passthrough.vm import Vm, VmConfig

CLI = [sys.executable, "-m", "shim_integration.cli"]


def _data(n: int) -> bytes:
    out = bytearray()
    block = hashlib.sha256(b"attach-bench").digest() * 128  # 4 KiB, varied per block below
    i = 0
    while len(out) < n:
        out += i.to_bytes(8, "little") + block[8:]
        i += 1
    return bytes(out[:n])


def build_layer(workdir: Path, size: int) -> tuple[Path, dict[str, Any]]:
    tar_path = workdir / "bench.tar"
    with tarfile.open(tar_path, "w") as tar:
        for name, data in (("small.txt", b"ready\n"), ("big.bin", _data(size))):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    blob = workdir / "bench.erofs"
    proc = subprocess.run(
        [*CLI, "convert", str(tar_path), str(blob), "--verity", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    return blob, json.loads(proc.stdout)["verity"]


def attach_latency(
    agent: AgentClient, at: Attacher, blob: Path, verity: dict[str, Any], transport: str
) -> dict[str, float]:
    t0 = time.monotonic()
    att = at.attach(blob, transport)
    t1 = time.monotonic()
    disk = find_disk(agent, att)
    t2 = time.monotonic()
    mapper = open_verity(agent, "bench", disk["path"], verity)
    t3 = time.monotonic()
    mnt = agent.mount(mapper)
    t4 = time.monotonic()
    assert agent.read_file(f"{mnt}/small.txt") == b"ready\n"
    t5 = time.monotonic()
    agent.teardown()
    t6 = time.monotonic()
    at.detach(att.device_id)
    t7 = time.monotonic()
    return {
        "attach_qmp": t1 - t0,
        "visible": t2 - t1,
        "verity_open": t3 - t2,
        "mount": t4 - t3,
        "first_read": t5 - t4,
        "total": t5 - t0,
        "teardown": t6 - t5,
        "detach": t7 - t6,
    }


def throughput(
    agent: AgentClient, at: Attacher, blob: Path, verity: dict[str, Any], transport: str, size: int
) -> dict[str, float]:
    att = at.attach(blob, transport)
    disk = find_disk(agent, att)
    out = {}
    raw = agent.read_speed(disk["path"], limit=size)
    out["raw_device"] = raw["bytes"] / raw["seconds"] / 1e6
    mapper = open_verity(agent, "bench", disk["path"], verity)
    ver = agent.read_speed(mapper, limit=size)
    out["verity_device"] = ver["bytes"] / ver["seconds"] / 1e6
    mnt = agent.mount(mapper)
    f = agent.read_speed(f"{mnt}/big.bin")
    assert f["bytes"] == size
    out["erofs_file_on_verity"] = f["bytes"] / f["seconds"] / 1e6
    agent.teardown()
    at.detach(att.device_id)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--size-mib", type=int, default=64)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    size = args.size_mib << 20
    image = ensure_guest_image()
    with tempfile.TemporaryDirectory(prefix="attach-bench-") as tmp:
        blob, verity = build_layer(Path(tmp), size)
        t0 = time.monotonic()
        with Vm(VmConfig.for_guest(image, root_ports=8)) as vm, Attacher(vm.qmp) as at:
            agent = vm.wait_agent(timeout=120)
            boot = time.monotonic() - t0
            lat = {
                t: [attach_latency(agent, at, blob, verity, t) for _ in range(args.rounds)]
                for t in TRANSPORTS
            }
            tput = {t: throughput(agent, at, blob, verity, t, size) for t in TRANSPORTS}
    result = {
        "boot_to_agent_s": boot,
        "latency_s": lat,
        "read_mb_s": tput,
        "rounds": args.rounds,
        "size_mib": args.size_mib,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"boot to agent-ready: {boot:.2f} s")
    keys = ["attach_qmp", "visible", "verity_open", "mount", "first_read", "total", "detach"]
    print("latency, median (best) of", args.rounds, "in ms:")
    print("| transport | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for t, runs in lat.items():
        cells = [
            f"{statistics.median(r[k] for r in runs) * 1e3:.0f} "
            f"({min(r[k] for r in runs) * 1e3:.0f})"
            for k in keys
        ]
        print(f"| {t} | " + " | ".join(cells) + " |")
    print(f"sequential read of {args.size_mib} MiB after drop_caches, MB/s:")
    print("| transport | raw device | dm-verity device | EROFS file on dm-verity |")
    print("|---|---|---|---|")
    for t, r in tput.items():
        print(
            f"| {t} | {r['raw_device']:.0f} | {r['verity_device']:.0f} | "
            f"{r['erofs_file_on_verity']:.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
