"""containerd from Debian's newer suites without installing it: trixie's 1.7 and sid's 2.x,
downloaded with a private apt configuration and unpacked into
~/.cache/erofs-passthrough/containerd/<version>/. Their binaries need only glibc 2.34, so they
run on bookworm (docs/design.md).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from shim_integration.testbed.containerd_private import Dist

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "erofs-passthrough"
MIRROR = "http://deb.debian.org/debian"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"


def _apt(state: Path, *args: str) -> subprocess.CompletedProcess:
    opts = [
        f"-oDir::Etc::SourceList={state / 'sources.list'}",
        "-oDir::Etc::SourceParts=/dev/null",
        f"-oDir::State::Lists={state / 'lists'}",
        f"-oDir::Cache={state / 'cache'}",
        "-oAPT::Get::List-Cleanup=0",
        "-qq",
    ]
    return subprocess.run(
        ["apt-get", *opts, *args], capture_output=True, text=True, check=True, cwd=state
    )


def _apt_state(suite: str) -> Path:
    state = CACHE / "apt" / suite
    for sub in ("lists/partial", "cache/archives/partial"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    (state / "sources.list").write_text(f"deb [signed-by={KEYRING}] {MIRROR} {suite} main\n")
    return state


def from_suite(suite: str) -> Dist:
    """containerd from Debian SUITE, downloaded and unpacked once (keyed by its version)."""
    record = CACHE / "containerd" / f"{suite}.json"
    if record.exists():
        data = json.loads(record.read_text())
        dist = Dist(data["version"], Path(data["bin_dir"]))
        if (dist.bin_dir / "containerd").exists():
            return dist
    state = _apt_state(suite)
    _apt(state, "update")
    for old in state.glob("*.deb"):
        old.unlink()
    _apt(state, "download", "containerd")
    deb = next(state.glob("containerd_*.deb"))
    version = deb.name.split("_")[1].split("~")[0].split("-")[0].split("+")[0]
    target = CACHE / "containerd" / version
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=target.parent))
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=True)
    shutil.rmtree(target, ignore_errors=True)
    os.rename(tmp, target)
    dist = Dist(version, target / "usr" / "bin")
    record.write_text(json.dumps({"version": version, "bin_dir": str(dist.bin_dir)}))
    return dist


# prefetch: python -m shim_integration.testbed.containerd_dist trixie sid
if __name__ == "__main__":
    import sys

    for suite in sys.argv[1:] or ["trixie", "sid"]:
        print(suite, from_suite(suite))
