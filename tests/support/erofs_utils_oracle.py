"""erofs-utils 1.8 built from Debian trixie's *source* package: a second oracle for the tests
and the anchor for the benchmarks.

    python -m tests.support.erofs_utils_oracle [--suite trixie] [--refresh]  # paths as JSON

The source package is fetched at run time with a private apt configuration (its own
`Dir::Etc::SourceList` with one `deb-src` line, `Dir::State::Lists` and `Dir::Cache` under the
cache), so the system's apt state is never touched and no binary package is installed. It is
built with autotools (lz4, zstd, uuid, zlib; no FUSE, no SELinux) and `mkfs.erofs`,
`fsck.erofs` and `dump.erofs` are kept in

    ~/.cache/erofs-passthrough/erofs-utils/<source version>/bin/

After the first build a lookup costs no network and no build: `<suite>.json` records which
version the suite had. `--refresh` asks the archive again and builds a newer version if the
suite moved on. The build headers and tools come from bookworm (`.ci/setup` installs them).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CACHE = (
    Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    / "erofs-passthrough"
    / "erofs-utils"
)
MIRROR = "http://deb.debian.org/debian"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
PROGRAMS = ("mkfs.erofs", "fsck.erofs", "dump.erofs")
# Debian's own flags where bookworm has the library; compression only matters for fsck of
# compressed images, but it keeps `mkfs.erofs -V` the same as trixie's build.
CONFIGURE_FLAGS = (
    "--disable-fuse",
    "--without-selinux",
    "--with-uuid",
    "--with-zlib",
    "--enable-lz4",
    "--with-libzstd",
    "--enable-multithreading",
)
# What the build needs, as (a file that proves it is there, the bookworm package to install).
BUILD_NEEDS = (
    ("/usr/bin/autoreconf", "autoconf"),
    ("/usr/bin/automake", "automake"),
    ("/usr/bin/libtoolize", "libtool"),
    ("/usr/bin/pkg-config", "pkgconf"),
    ("/usr/bin/make", "make"),
    ("/usr/bin/gcc", "gcc"),
    ("/usr/bin/dpkg-source", "dpkg-dev"),
    ("/usr/include/lz4.h", "liblz4-dev"),
    ("/usr/include/zstd.h", "libzstd-dev"),
    ("/usr/include/uuid/uuid.h", "uuid-dev"),
    ("/usr/include/zlib.h", "zlib1g-dev"),
)


class OracleUnavailable(RuntimeError):
    """The build prerequisites are missing (the message names the packages)."""


@dataclass(frozen=True)
class ErofsUtils:
    """One erofs-utils build: its Debian source version and its programs."""

    version: str
    bin_dir: Path

    @property
    def mkfs(self) -> str:
        return str(self.bin_dir / "mkfs.erofs")

    @property
    def fsck(self) -> str:
        return str(self.bin_dir / "fsck.erofs")

    @property
    def dump(self) -> str:
        return str(self.bin_dir / "dump.erofs")

    @property
    def upstream_version(self) -> str:
        """`1.8.6` for the source version `1.8.6-1`."""
        return self.version.split(":")[-1].rsplit("-", 1)[0]

    def complete(self) -> bool:
        return all(os.access(self.bin_dir / p, os.X_OK) for p in PROGRAMS)


def mkfs_tar(oracle: ErofsUtils, layer: Path, out: Path, *extra: str) -> Path:
    """`mkfs.erofs --tar=f --aufs` of LAYER into OUT (tail-packed, 1.8's default); a failure
    is an AssertionError with 1.8's message, and OUT removed (1.8 leaves a 2 TiB sparse file
    when it fails)."""
    proc = subprocess.run(
        [oracle.mkfs, "--quiet", "--tar=f", "--aufs", *extra, str(out), str(layer)],
        capture_output=True,
        text=True,
        errors="replace",
    )
    if proc.returncode != 0:
        out.unlink(missing_ok=True)
        raise AssertionError(f"mkfs.erofs {oracle.version} failed: {proc.stderr}")
    return out


def missing_build_needs() -> list[str]:
    """The bookworm packages the build needs and this machine lacks."""
    return sorted({pkg for path, pkg in BUILD_NEEDS if not Path(path).exists()})


def erofs_utils(suite: str = "trixie", *, refresh: bool = False) -> ErofsUtils:
    """erofs-utils from SUITE's source package, built once and cached (keyed by version)."""
    record = CACHE / f"{suite}.json"
    if not refresh:
        cached = _from_record(record)
        if cached is not None:
            return cached
    CACHE.mkdir(parents=True, exist_ok=True)
    with _locked(CACHE / ".lock"):
        if not refresh:  # another process may have built it while we waited
            cached = _from_record(record)
            if cached is not None:
                return cached
        state = _apt_state(suite)
        _apt(state, "update")
        version = _source_version(state)
        built = ErofsUtils(version, CACHE / version / "bin")
        if not built.complete():
            _build(state, version, CACHE / version)
        record.write_text(json.dumps({"version": version, "bin_dir": str(built.bin_dir)}) + "\n")
        return built


def _from_record(record: Path) -> ErofsUtils | None:
    try:
        data = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    built = ErofsUtils(data["version"], Path(data["bin_dir"]))
    return built if built.complete() else None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _apt_state(suite: str) -> Path:
    state = CACHE / "apt" / suite
    for sub in ("lists/partial", "cache/archives/partial"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    (state / "sources.list").write_text(f"deb-src [signed-by={KEYRING}] {MIRROR} {suite} main\n")
    return state


def _apt(
    state: Path, *args: str, cwd: Path | None = None, tool: str = "apt-get"
) -> subprocess.CompletedProcess[str]:
    opts = [
        f"-oDir::Etc::SourceList={state / 'sources.list'}",
        "-oDir::Etc::SourceParts=/dev/null",
        f"-oDir::State::Lists={state / 'lists'}",
        f"-oDir::State::Status={state / 'status'}",
        f"-oDir::Cache={state / 'cache'}",
        "-oAPT::Get::List-Cleanup=0",
        "-oAPT::Sandbox::User=root",
        "-qq",
    ]
    (state / "status").touch()
    proc = subprocess.run([tool, *opts, *args], capture_output=True, text=True, cwd=cwd or state)
    if proc.returncode != 0:
        raise RuntimeError(f"{tool} {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


def _source_version(state: Path) -> str:
    """The newest erofs-utils source version in the private index."""
    out = _apt(state, "showsrc", "--only-source", "erofs-utils", tool="apt-cache").stdout
    versions = [
        line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Version:")
    ]
    if not versions:
        raise RuntimeError("the suite has no erofs-utils source package")
    best = versions[0]
    for v in versions[1:]:
        if subprocess.run(["dpkg", "--compare-versions", v, "gt", best]).returncode == 0:
            best = v
    return best


def _build(state: Path, version: str, target: Path) -> None:
    missing = missing_build_needs()
    if missing:
        raise OracleUnavailable(
            "building erofs-utils needs these Debian packages "
            f"(.ci/setup installs them): {' '.join(missing)}"
        )
    work = Path(tempfile.mkdtemp(prefix=f".build-{version}-", dir=CACHE))
    try:
        started = time.monotonic()
        _apt(state, "source", f"erofs-utils={version}", cwd=work)
        src = next(p for p in work.iterdir() if p.is_dir())
        log = work / "build.log"
        env = {**os.environ, "LC_ALL": "C"}
        jobs = str(os.cpu_count() or 1)
        for cmd in (["./autogen.sh"], ["./configure", *CONFIGURE_FLAGS], ["make", f"-j{jobs}"]):
            with open(log, "a") as out:
                proc = subprocess.run(cmd, cwd=src, env=env, stdout=out, stderr=subprocess.STDOUT)
            if proc.returncode != 0:
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
                raise RuntimeError(f"erofs-utils {version}: {' '.join(cmd)} failed:\n{tail}")
        staged = work / "out"
        (staged / "bin").mkdir(parents=True)
        for prog, sub in zip(PROGRAMS, ("mkfs", "fsck", "dump"), strict=True):
            shutil.copy2(src / sub / prog, staged / "bin" / prog)
        dsc = next(work.glob("*.dsc"))
        shutil.copy2(dsc, staged / dsc.name)
        (staged / "build.json").write_text(
            json.dumps(
                {
                    "source_version": version,
                    "configure": list(CONFIGURE_FLAGS),
                    "build_seconds": round(time.monotonic() - started, 1),
                },
                indent=1,
            )
            + "\n"
        )
        shutil.rmtree(target, ignore_errors=True)
        os.rename(staged, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def build_info(tools: ErofsUtils) -> dict[str, object]:
    """What `_build` recorded next to the programs (source version, flags, build time)."""
    try:
        return json.loads((tools.bin_dir.parent / "build.json").read_text())
    except (OSError, ValueError):
        return {}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tests.support.erofs_utils_oracle", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--suite", default="trixie")
    ap.add_argument(
        "--refresh",
        action="store_true",
        help="ask the archive for the suite's current version (builds if newer)",
    )
    args = ap.parse_args(argv)
    try:
        tools = erofs_utils(args.suite, refresh=args.refresh)
    except (OracleUnavailable, RuntimeError) as exc:
        print(f"erofs_utils_oracle: {exc}", file=sys.stderr)
        return 1
    print(
        json.dumps(
            {
                "version": tools.version,
                "bin_dir": str(tools.bin_dir),
                "mkfs": tools.mkfs,
                "fsck": tools.fsck,
                "dump": tools.dump,
                "build": build_info(tools),
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
