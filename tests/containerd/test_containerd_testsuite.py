"""containerd's own snapshotter conformance suite against `serve`, over containerd's proxy client.

The suite (`github.com/containerd/containerd/snapshots/testsuite`, from Debian's
golang-github-containerd-containerd-dev, containerd 1.6) is driven by our Go file in
tests/containerd_testsuite/: one `serve` per case on a fresh root, stopped with SIGTERM at the
end of the case (a serve that is still running 10 s later fails the case). The test binary is
built offline in GOPATH mode with Debian's golang-go and cached under

    ~/.cache/erofs-passthrough/containerd-testsuite/<go>-<containerd-dev>-<hash>/suite.test

keyed by the Go version, the containerd-dev package version and a hash of our Go source and of
every installed golang-*-dev package version, so CI builds it once and then only runs it.
Every case must PASS; the only SKIP allowed is Rename, with the suite's own skip message (the
1.6 suite skips it for every snapshotter; 1.7+ skips it for overlay-based ones).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from shim_integration.testbed.containerd_private import unmount_under
from tests.support.helpers import require_root

REPO = Path(__file__).resolve().parents[2]
GO_SOURCE = REPO / "tests" / "containerd_testsuite"
GOCODE = Path("/usr/share/gocode")
SUITE_PACKAGE = GOCODE / "src/github.com/containerd/containerd/snapshots/testsuite"
CONTAINERD_DEV = "golang-github-containerd-containerd-dev"
CACHE = (
    Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    / "erofs-passthrough"
    / "containerd-testsuite"
)
TOP = "TestErofsPassthroughSnapshotter"
# The cases of containerd 1.6's SnapshotterSuite; a suite that ran fewer has not run at all.
SUITE_CASES = frozenset(
    {
        "Basic",
        "StatActive",
        "StatComitted",
        "TransitivityTest",
        "PreareViewFailingtest",
        "Update",
        "Remove",
        "Walk",
        "LayerFileupdate",
        "RemoveDirectoryInLowerLayer",
        "Chown",
        "DirectoryPermissionOnCommit",
        "RemoveIntermediateSnapshot",
        "DeletedFilesInChildSnapshot",
        "MoveFileFromLowerLayer",
        "Rename",
        "ViewReadonly",
        "StatInWalk",
        "CloseTwice",
        "RootPermission",
        "128LayersMount",
    }
)
ALLOWED_SKIPS = {"Rename": "rename test still fails on some kernels with overlay"}
BUILD_TIMEOUT = 900
RUN_TIMEOUT = 900

_HEADER = re.compile(r"^=== (?:RUN|CONT|NAME)\s+(\S+)")
_RESULT = re.compile(r"^\s*--- (PASS|FAIL|SKIP): (\S+) \(")


@dataclass
class SuiteReport:
    """`go test -test.v` output of TOP, split per case (subtest name without `TOP/`): each case's
    result (PASS, FAIL, SKIP) and the lines it logged (parallel cases interleave; Go marks each
    switch with `=== CONT`)."""

    top_result: str | None = None
    results: dict[str, str] = field(default_factory=dict)
    output: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> SuiteReport:
        report = cls()
        current: str | None = None
        for line in text.splitlines():
            if m := _HEADER.match(line):
                current = m.group(1).removeprefix(f"{TOP}/")
                report.output.setdefault(current, [])
            elif m := _RESULT.match(line):
                result, name = m.groups()
                if name == TOP:
                    report.top_result = result
                else:
                    report.results[name.removeprefix(f"{TOP}/")] = result
                current = None  # what follows a result line is the next result or a summary
            elif current is not None:
                report.output[current].append(line)
        report.output.pop(TOP, None)
        return report

    def cases(self, result: str | None) -> list[str]:
        """The cases that ran and ended with RESULT (None: that never reported one)."""
        return sorted(name for name in self.output if self.results.get(name) == result)


def _command_output(cmd: list[str]) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


def _cache_dir(go: str) -> Path:
    """Where the binary for this Go, this containerd source and our Go source lives."""
    go_version = _command_output([go, "env", "GOVERSION"])
    containerd_dev = _command_output(["dpkg-query", "-W", "-f=${Version}", CONTAINERD_DEV])
    digest = hashlib.sha256()
    for path in sorted(GO_SOURCE.rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(GO_SOURCE).as_posix().encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
    # The suite's dependencies (grpc, gogo protobuf, continuity, ...) are other -dev packages.
    digest.update(
        _command_output(["dpkg-query", "-W", "-f=${Package} ${Version}\n", "golang-*"]).encode()
    )
    safe = re.sub(r"[^A-Za-z0-9.+-]", "_", f"{go_version}-containerd{containerd_dev}")
    return CACHE / f"{safe}-{digest.hexdigest()[:16]}"


def build_suite() -> Path:
    """The cached test binary, built now if missing (temp name, then rename: never half)."""
    go = shutil.which("go")
    if go is None or not SUITE_PACKAGE.is_dir():
        pytest.skip(f"needs Debian's golang-go and {CONTAINERD_DEV} (installed by .ci/setup)")
    cache = _cache_dir(go)
    binary = cache / "suite.test"
    if binary.exists():
        return binary
    cache.mkdir(parents=True, exist_ok=True)
    partial = cache / f"suite.test.tmp-{os.getpid()}"
    env = {
        **os.environ,
        "GO111MODULE": "off",
        "GOFLAGS": "",
        "GOPROXY": "off",
        "GOPATH": f"{CACHE / 'gopath'}:{GOCODE}",
        "GOCACHE": str(CACHE / "go-build"),
    }
    try:
        build = subprocess.run(
            [go, "test", "-c", "-o", str(partial), "."],
            cwd=GO_SOURCE,
            env=env,
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT,
        )
        assert build.returncode == 0, f"building the suite failed:\n{build.stdout}{build.stderr}"
        os.replace(partial, binary)
    finally:
        partial.unlink(missing_ok=True)
    return binary


@pytest.mark.root
@pytest.mark.slow
def test_containerd_snapshotter_suite_passes(tmp_path: Path) -> None:
    require_root()  # the suite mounts every snapshot it checks
    binary = build_suite()
    logs = tmp_path / "serve-logs"
    logs.mkdir()
    # The suite's per-case directories hold serve's socket: under pytest's long tmp_path its
    # path would pass the 107 bytes a unix socket address can have.
    suite_tmp = Path(tempfile.mkdtemp(prefix="ep-gosuite-", dir="/tmp"))
    env = {
        **os.environ,
        "TMPDIR": str(suite_tmp),
        "EROFS_PASSTHROUGH_PYTHON": sys.executable,
        "EROFS_PASSTHROUGH_SUITE_LOGS": str(logs),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    # Its own session: serve processes the binary leaves behind (a Go timeout panic skips the
    # cases' cleanups) are found by process group and killed, never left running.
    suite = subprocess.Popen(
        [str(binary), "-test.v", "-test.timeout", "10m"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = suite.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(suite.pid, signal.SIGKILL)
        output, _ = suite.communicate()
        output += f"\n(killed after {RUN_TIMEOUT} s)"
    finally:
        survivors = _kill_process_group(suite.pid)
        leftover = _mounts_under(suite_tmp)
        unmount_under(suite_tmp)
        shutil.rmtree(suite_tmp, ignore_errors=True)
    report = SuiteReport.parse(output)

    never_ran = sorted(SUITE_CASES - report.output.keys())
    failed, unresolved = report.cases("FAIL"), report.cases(None)
    bad_skips = [
        name
        for name in report.cases("SKIP")
        if not any(ALLOWED_SKIPS.get(name, "\0") in line for line in report.output[name])
    ]
    details = "\n".join(
        f"--- {name}:\n" + "\n".join(report.output[name])
        for name in [*failed, *bad_skips, *unresolved]
    )
    assert not (never_ran or unresolved or failed or bad_skips) and suite.returncode == 0, (
        f"containerd snapshotter suite: failed {failed}, skipped (not allowed) {bad_skips}, "
        f"no result {unresolved}, never ran {never_ran}, exit status {suite.returncode}; "
        f"serve logs in {logs}\n{details}\n--- end of output:\n{output[-4000:]}"
    )
    assert report.top_result == "PASS", output[-4000:]
    assert not survivors, "serve processes outlived the suite (killed)"
    assert not leftover, f"mounts left under the suite's directories: {leftover}"


def _kill_process_group(pgid: int) -> bool:
    """SIGKILL whatever is left in process group PGID; whether anything was."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


def _mounts_under(base: Path) -> list[str]:
    prefix = str(base.resolve()) + "/"
    return [
        line.split()[4]
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if line.split()[4].startswith(prefix)
    ]
