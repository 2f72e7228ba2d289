"""A throwaway OCI registry on 127.0.0.1 and pushes to it: what `demo --registry` and the
registry tests run.

- `running_registry(dir)`: Debian's `docker-registry` (the CNCF distribution server, 2.8: no
  referrers API) serving a scratch filesystem storage below DIR, on a free port; stopped on exit.
- `push_archive(archive, reference, tmp)`: `skopeo copy oci-archive:... docker://...` over plain
  HTTP. As root it runs in a private mount namespace with an empty tmpfs on /var/lib/containers:
  skopeo's blob-info cache there can silently substitute a blob pushed earlier (docs/design.md,
  "Registry").
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import requests

from snapshotter.errors import EpError

START_TIMEOUT = 15.0
PUSH_TIMEOUT = 300.0


class RegistryError(EpError):
    """The local registry did not start, or a push to it failed; the message says why."""


@dataclass(frozen=True)
class LocalRegistry:
    host: str  # 127.0.0.1:PORT
    storage: Path  # the distribution server's filesystem storage root

    def blob_file(self, digest: str) -> Path:
        """Where the server keeps a blob's bytes (to alter one, as a hostile registry)."""
        hexdigest = digest.removeprefix("sha256:")
        return self.storage / "docker/registry/v2/blobs/sha256" / hexdigest[:2] / hexdigest / "data"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RegistryError(f"{name} not found: apt-get install {name}")
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on now (also: a registry that is not there)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_registry(directory: Path) -> Iterator[LocalRegistry]:
    exe = _tool("docker-registry")
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    storage = directory / "storage"
    config = directory / "registry.yml"
    log_path = directory / "registry.log"
    config.write_text(f"""version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: {storage}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{port}
""")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([exe, "serve", str(config)], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/v2/", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace").strip().splitlines()[-1:]
                raise RegistryError(f"docker-registry exited ({proc.returncode}): {' '.join(tail)}")
            if time.monotonic() > deadline:
                raise RegistryError(f"docker-registry did not answer in {START_TIMEOUT:.0f} s")
            time.sleep(0.1)
        yield LocalRegistry(f"127.0.0.1:{port}", storage)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def push_archive(archive: Path, reference: str, tmp: Path) -> None:
    """Push an OCI archive to REFERENCE (host:port/repo:tag) over plain HTTP."""
    skopeo = _tool("skopeo")
    scratch = tmp / "skopeo"
    scratch.mkdir(parents=True, exist_ok=True)
    argv = [
        skopeo,
        "copy",
        "--tmpdir",
        str(scratch),
        "--quiet",
        f"oci-archive:{archive}",
        f"docker://{reference}",
        "--dest-tls-verify=false",
    ]
    unshare = shutil.which("unshare")
    if os.geteuid() == 0 and unshare is not None:
        Path("/var/lib/containers").mkdir(parents=True, exist_ok=True)
        argv = [
            unshare,
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            'mount -t tmpfs tmpfs /var/lib/containers && exec "$@"',
            "sh",
            *argv,
        ]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=PUSH_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise RegistryError(
            f"skopeo push to {reference}: no answer in {PUSH_TIMEOUT:.0f} s"
        ) from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RegistryError(f"skopeo push to {reference} failed: {last}")
