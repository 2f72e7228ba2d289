"""Shared plumbing for the guest image build: cache location, locking, atomic writes, commands.

Everything built here lands under ``$EROFS_PASSTHROUGH_CACHE`` (default
``~/.cache/erofs-passthrough``) in ``guest/``, one entry per cache key. Files are written under a
temporary name, fsynced and renamed; directories are built beside their final name and renamed
into place, so an interrupted build never leaves a half-written entry that a later run would trust.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent


class BuildError(Exception):
    """A build step failed; the message says which and why."""


def cache_root() -> Path:
    base = os.environ.get("EROFS_PASSTHROUGH_CACHE")
    root = Path(base) if base else Path.home() / ".cache" / "erofs-passthrough"
    guest = root / "guest"
    guest.mkdir(parents=True, exist_ok=True)
    return guest


@contextlib.contextmanager
def build_lock(root: Path) -> Iterator[None]:
    """One builder at a time per cache (tests and the CLI may start builds concurrently)."""
    with open(root / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def digest(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:16]


def source_digest(*names: str) -> str:
    """Hash of builder source files next to this one: changing the recipe changes the key."""
    return digest(*((HERE / n).read_bytes() for n in names))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fchmod(fh.fileno(), mode)
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def write_json(path: Path, obj: object) -> None:
    write_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def commit_file(tmp: Path, final: Path) -> None:
    """fsync a finished temporary file and rename it into place."""
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    fsync_dir(final.parent)


@contextlib.contextmanager
def staging_dir(final: Path) -> Iterator[Path]:
    """A scratch directory beside FINAL; renamed to FINAL if the block succeeds, else removed."""
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        yield tmp
        os.sync()  # the tree's files reach the disk before the name that vouches for them
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def run(argv: Iterable[str | os.PathLike[str]], **kwargs: object) -> subprocess.CompletedProcess:
    """Run a command; on failure raise BuildError with its stderr tail."""
    args = [str(a) for a in argv]
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    try:
        proc = subprocess.run(args, check=False, **kwargs)  # type: ignore[call-overload]
    except FileNotFoundError as exc:
        raise BuildError(f"{args[0]}: not installed (run .ci/setup)") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or "")[-2000:] if isinstance(proc.stderr, str) else ""
        raise BuildError(f"{' '.join(args[:4])}... failed ({proc.returncode}): {tail.strip()}")
    return proc


_APT_CACHE: dict[str, dict[str, str]] = {}


def apt_fields(packages: Iterable[str]) -> dict[str, dict[str, str]]:
    """The candidate's control fields of each package, as apt would fetch it now (from the
    host's package lists). One `apt-cache show` for all names not asked before (each call reads
    all the package lists, so the builder asks for everything it needs in one go)."""
    names = list(packages)
    todo = [n for n in names if n not in _APT_CACHE]
    if todo:
        out = run(["apt-cache", "show", "--no-all-versions", *todo]).stdout
        for para in out.split("\n\n"):
            fields: dict[str, str] = {}
            for line in para.splitlines():
                if line[:1] not in (" ", "") and ": " in line:
                    k, v = line.split(": ", 1)
                    fields[k] = v
            if "Package" in fields:
                _APT_CACHE.setdefault(fields["Package"], fields)
    missing = [n for n in names if n not in _APT_CACHE]
    if missing:
        raise BuildError(f"apt knows no candidate for {missing} (run apt-get update)")
    return {n: _APT_CACHE[n] for n in names}


def candidate_versions(packages: Iterable[str]) -> dict[str, str]:
    return {n: f["Version"] for n, f in apt_fields(packages).items()}


def apt_download(package: str, version: str, dest: Path) -> Path:
    """`apt-get download PACKAGE=VERSION` into DEST (cached: reused when already there)."""
    dest.mkdir(parents=True, exist_ok=True)
    for existing in dest.glob(f"{package}_*.deb"):
        if run(["dpkg-deb", "-f", existing, "Version"]).stdout.strip() == version:
            return existing
    with tempfile.TemporaryDirectory(dir=dest, prefix=".dl.") as tmp:
        # apt drops privileges to _apt when it can; a private directory it cannot enter only
        # makes it warn, so open the directory up for the download.
        os.chmod(tmp, 0o755)
        run(["apt-get", "download", "-q", f"{package}={version}"], cwd=tmp)
        debs = list(Path(tmp).glob(f"{package}_*.deb"))
        if len(debs) != 1:
            raise BuildError(f"apt-get download {package}={version} produced {debs}")
        final = dest / debs[0].name
        commit_file(debs[0], final)
    return final


def prune(root: Path, current: Iterable[Path], keep_others: int = 2) -> list[Path]:
    """Remove old cache entries: per kind (kernel-, tree-, initramfs-, root-), keep the current
    ones and the KEEP_OTHERS most recently used others (a root image is ~130 MB, and each
    change to the converter or the agent makes a new one)."""
    keep = {p.name for p in current} | {p.with_suffix(".json").name for p in current}
    removed = []
    for kind in ("kernel-", "tree-", "initramfs-", "root-"):
        entries = [
            p
            for p in root.iterdir()
            if p.name.startswith(kind) and p.name not in keep and p.suffix != ".json"
        ]
        entries.sort(key=lambda p: p.stat().st_mtime, reverse=True)
        for old in entries[keep_others:]:
            if old.is_dir():
                shutil.rmtree(old)
            else:
                old.unlink()
                old.with_suffix(".json").unlink(missing_ok=True)
            removed.append(old)
    return removed
