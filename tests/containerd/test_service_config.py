"""`serve` as an operator starts it: the config file checked with types and one line per problem
(exit 2), `serve --help` listing every key, the start-up checks of the host (root, erofs, loop,
device-mapper, paths), `status` over the health service, and `--version`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import fields
from importlib.metadata import version
from pathlib import Path

import grpc
import pytest

from shim_integration.testbed.containerd_private import SnapshotterProcess, unmount_under, wait_for
from snapshotter.service import preflight
from snapshotter.service.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter.service.api.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from snapshotter.service.serve_config import ConfigError, ServeConfig, load_config, toml_literal
from tests.support.helpers import error_lines, require_root, require_tool

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: str, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "shim_integration.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


def serve_with(tmp_path: Path, toml: str, *extra: str) -> subprocess.CompletedProcess:
    config = tmp_path / "serve.toml"
    config.write_text(toml)
    return run_cli(
        "serve",
        "--root",
        str(tmp_path / "root"),
        "--address",
        str(tmp_path / "sn.sock"),
        "--config",
        str(config),
        *extra,
        timeout=30,
    )


@pytest.fixture
def service(tmp_path: Path) -> Iterator[SnapshotterProcess]:
    require_root()
    proc = SnapshotterProcess(tmp_path / "root", tmp_path / "sn.sock", tmp_path / "sn.log").start()
    yield proc
    if proc.proc is not None and proc.proc.poll() is None:
        proc.stop()
    unmount_under(tmp_path)


@pytest.mark.parametrize(
    ("toml", "line"),
    [
        ('vm_mode = "false"\n', "key 'vm_mode' must be a boolean, got string \"false\""),
        ("workers = true\n", "key 'workers' must be an integer, got boolean true"),
        ("workers = 0\n", "key 'workers' must be at least 1, got integer 0"),
        ('grace_seconds = "5"\n', "key 'grace_seconds' must be a number, got string \"5\""),
        ('log_level = "loud"\n', "key 'log_level' must be one of debug, info, warning, error"),
        (
            'root = "relative/dir"\n',
            "key 'root' must be an absolute path, got string \"relative/dir\"",
        ),
        ("address = 7\n", "key 'address' must be a non-empty path string, got integer 7"),
        ("vm-mode = true\n", "unknown key 'vm-mode' (did you mean 'vm_mode'?)"),
        ("[root]\nx = 1\n", "key 'root' must be a non-empty path string, got table"),
        ("workers = = 3\n", "not valid TOML: "),
    ],
)
def test_bad_config_is_one_line_and_exit_2(tmp_path: Path, toml: str, line: str) -> None:
    proc = serve_with(tmp_path, toml)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith(f"erofs-passthrough serve: config {tmp_path / 'serve.toml'}: ")
    assert line in proc.stderr
    assert not (tmp_path / "root").exists() and not (tmp_path / "sn.sock").exists()


def test_every_problem_is_reported_on_its_own_line(tmp_path: Path) -> None:
    proc = serve_with(tmp_path, 'vm_mode = "false"\nworkers = -1\nnope = 1\n')
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 3 and all(s.startswith("erofs-passthrough serve: config ") for s in lines)
    assert ["vm_mode" in lines[0], "workers" in lines[1], "nope" in lines[2]] == [True] * 3


@pytest.mark.parametrize("kind", ["missing", "directory", "fifo", "not utf-8"])
def test_unreadable_config_file_is_one_line(tmp_path: Path, kind: str) -> None:
    config = tmp_path / "serve.toml"
    if kind == "directory":
        config.mkdir()
    elif kind == "fifo":
        os.mkfifo(config)  # opening it would block the start
    elif kind == "not utf-8":
        config.write_bytes(b'log_level = "\xff"\n')
    proc = run_cli("serve", "--root", str(tmp_path / "root"), "--config", str(config), timeout=30)
    assert proc.returncode == 2, proc.stderr
    expected = {
        "missing": "cannot read: No such file or directory",
        "directory": "not a regular file",
        "fifo": "not a regular file",
        "not utf-8": "not UTF-8 text",
    }[kind]
    assert proc.stderr.startswith(f"erofs-passthrough serve: config {config}: {expected}")
    assert proc.stderr.count("\n") == 1


def test_booleans_mean_what_they_say(tmp_path: Path) -> None:
    config = tmp_path / "serve.toml"
    config.write_text("vm_mode = false\nworkers = 4\ngrace_seconds = 1\n")
    loaded = load_config(config, root=Path("rel"))
    assert loaded.vm_mode is False and loaded.workers == 4 and loaded.grace_seconds == 1.0
    assert loaded.root == Path.cwd() / "rel"  # a flag is relative to where it was typed
    config.write_text("vm_mode = true\n")
    assert load_config(config).vm_mode is True
    with pytest.raises(ConfigError):
        config.write_text('vm_mode = "true"\n')
        load_config(config)


def test_config_file_keys_reach_the_running_service(tmp_path: Path) -> None:
    require_root()
    socket = tmp_path / "from-config.sock"
    config = tmp_path / "serve.toml"
    config.write_text(
        f'address = "{socket}"\nlog_level = "debug"\nworkers = 2\n'
        "vm_mode = false\ngrace_seconds = 1.5\n"
    )
    log = tmp_path / "sn.log"
    with open(log, "ab") as out:
        serve = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "snapshotter.service.cli",
                "serve",
                "--root",
                str(tmp_path / "root"),
                "--config",
                str(config),
            ],
            cwd=REPO,
            stdout=out,
            stderr=out,
        )
    service = SnapshotterProcess(tmp_path / "root", socket, log)
    service.proc = serve
    try:
        wait_for(service.healthy, 20, f"serve on {socket}", serve)
        status = run_cli("status", "--config", str(config), "--json")
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["address"] == str(socket)
        with grpc.insecure_channel(f"unix:{socket}") as channel, pytest.raises(grpc.RpcError):
            pb_grpc.SnapshotsStub(channel).Stat(pb.StatSnapshotRequest(key="ns/1/x"), timeout=30)
    finally:
        assert service.stop() == 0
    # log_level = "debug" from the file: every RPC is logged
    assert '"level": "debug"' in log.read_text() and '"key": "ns/1/x"' in log.read_text()


def test_serve_help_names_the_diff_service_and_every_key() -> None:
    proc = run_cli("serve", "--help")
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    assert "Diff API" in text and "Snapshots API" in text
    defaults = ServeConfig()
    for f in fields(ServeConfig):
        assert f"{f.name} = {toml_literal(getattr(defaults, f.name))}" in text, f.name
        assert " ".join(f.metadata["help"].split()) in text, f.name


def test_version_comes_from_the_package_metadata() -> None:
    proc = run_cli("--version")
    assert proc.returncode == 0
    assert proc.stdout == f"erofs-passthrough {version('erofs-passthrough')}\n"


# --- preflight ------------------------------------------------------------------------------


def test_not_root_is_one_line(tmp_path: Path) -> None:
    require_root()  # to become someone else
    setpriv = require_tool("setpriv")
    tmp_path.chmod(0o777)
    proc = subprocess.run(
        [
            setpriv,
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            sys.executable,
            "-m",
            "shim_integration.cli",
            "serve",
            "--root",
            str(tmp_path / "root"),
            "--address",
            str(tmp_path / "sn.sock"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1, proc.stderr
    lines = error_lines(proc.stderr)
    assert lines[0] == (
        "erofs-passthrough serve: must run as root (running as uid 65534): the "
        "service mounts layers and serves containerd"
    )
    # and whatever else nobody cannot do, one line each (here: reach the pytest directory)
    assert all(line.startswith("erofs-passthrough serve: ") for line in lines), lines
    assert not (tmp_path / "root").exists()


@pytest.mark.parametrize("which", ["root", "socket"])
def test_path_that_is_a_file_is_one_line(tmp_path: Path, which: str) -> None:
    require_root()
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    root = blocker if which == "root" else tmp_path / "root"
    socket = blocker / "sn.sock" if which == "socket" else tmp_path / "sn.sock"
    proc = run_cli("serve", "--root", str(root), "--address", str(socket), timeout=30)
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.splitlines()[-1]
    what = "state directory" if which == "root" else "socket directory"
    assert last == f"erofs-passthrough serve: {what} {blocker} is not a directory"
    assert "Traceback" not in proc.stderr
    assert blocker.read_text() == "not a directory\n"


def test_socket_path_too_long_for_unix_sockets_is_one_line(tmp_path: Path) -> None:
    require_root()
    socket = tmp_path / ("s" * 120 + ".sock")
    proc = run_cli("serve", "--root", str(tmp_path / "root"), "--address", str(socket), timeout=30)
    assert proc.returncode == 1, proc.stderr
    size = len(str(socket))
    assert error_lines(proc.stderr) == [
        f"erofs-passthrough serve: socket path {socket} is {size} "
        "bytes; a unix socket path has at most 107"
    ]


def test_missing_socket_directory_is_created(service: SnapshotterProcess) -> None:
    assert service.healthy()


def test_host_devices_are_warned_about_only_when_missing(service: SnapshotterProcess) -> None:
    log = service.log.read_text()
    for device in (preflight.LOOP_CONTROL, preflight.DM_CONTROL):
        warned = any(
            json.loads(line).get("level") == "warning" and str(device) in line
            for line in log.splitlines()
            if line.startswith("{")
        )
        assert warned == (not device.exists()), (device, log)
    assert service.healthy()  # warnings do not stop the service


def test_kernel_erofs_check(tmp_path: Path) -> None:
    # This kernel has erofs (every other test mounts it): no finding.
    assert preflight.check_erofs() is None
    # A kernel without it cannot be made here; the decision is checked on a table without it.
    table = tmp_path / "filesystems"
    table.write_text(
        "".join(
            line + "\n"
            for line in Path("/proc/filesystems").read_text().splitlines()
            if not line.endswith("erofs")
        )
    )
    finding = preflight.check_erofs(table, try_modprobe=False)
    assert finding is not None and finding.fatal
    assert finding.message.startswith(f"the kernel has no erofs filesystem (not in {table})")


def test_signing_key_must_be_readable(tmp_path: Path) -> None:
    require_root()
    config = tmp_path / "serve.toml"
    config.write_text(f'signing_key = "{tmp_path / "no-such.key"}"\n')
    proc = run_cli(
        "serve",
        "--root",
        str(tmp_path / "root"),
        "--address",
        str(tmp_path / "sn.sock"),
        "--config",
        str(config),
        timeout=30,
    )
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-1] == (
        f"erofs-passthrough serve: signing key {tmp_path / 'no-such.key'} is not a regular file "
        "(or does not exist)"
    )


# --- status ---------------------------------------------------------------------------------


def test_status_of_a_running_service(service: SnapshotterProcess) -> None:
    proc = run_cli("status", "--address", str(service.socket))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "(server)\tSERVING",
        "containerd.services.snapshots.v1.Snapshots\tSERVING",
        "containerd.services.diff.v1.Diff\tSERVING",
    ]
    proc = run_cli("status", "--address", str(service.socket), "--json")
    assert json.loads(proc.stdout)["services"] == {
        "": "SERVING",
        "containerd.services.snapshots.v1.Snapshots": "SERVING",
        "containerd.services.diff.v1.Diff": "SERVING",
    }


def test_status_when_nothing_listens(tmp_path: Path) -> None:
    proc = run_cli("status", "--address", str(tmp_path / "none.sock"))
    assert proc.returncode == 1
    assert (
        proc.stderr == f"erofs-passthrough status: nothing listens on {tmp_path}/none.sock: "
        "no such socket\n"
    )
    import socket as socketlib

    dead = tmp_path / "dead.sock"
    s = socketlib.socket(socketlib.AF_UNIX)
    s.bind(str(dead))
    s.close()  # bound, never listening: connection refused
    proc = run_cli("status", "--address", str(dead))
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith(f"erofs-passthrough status: nothing answers on {dead}: ")


@pytest.mark.parametrize("kind", ["file", "symlink", "fifo"])
def test_stray_entry_in_snapshots_does_not_stop_the_start(tmp_path: Path, kind: str) -> None:
    require_root()
    snapshots = tmp_path / "root" / "snapshots"
    snapshots.mkdir(parents=True)
    stray = snapshots / "stray"
    if kind == "file":
        stray.write_text("left by an operator\n")
    elif kind == "symlink":
        stray.symlink_to("/etc/passwd")
    else:
        os.mkfifo(stray)
    log = tmp_path / "sn.log"
    with open(log, "ab") as out:
        serve = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "snapshotter.service.cli",
                "serve",
                "--root",
                str(tmp_path / "root"),
                "--address",
                str(tmp_path / "sn.sock"),
            ],
            cwd=REPO,
            stdout=out,
            stderr=out,
        )
    service = SnapshotterProcess(tmp_path / "root", tmp_path / "sn.sock", log)
    try:
        wait_for(service.healthy, 20, "serve with a stray entry", serve)
    finally:
        serve.kill()  # SIGKILL: a start stuck on a FIFO does not answer SIGTERM
        serve.wait()
    assert "Traceback" not in log.read_text()
    assert "not a snapshot of ours; left alone" in log.read_text()
    assert os.path.lexists(stray)  # an operator's entry is reported, never removed
    assert Path("/etc/passwd").is_file()  # never followed


def test_status_without_access_to_the_socket_is_one_line(tmp_path: Path) -> None:
    require_root()
    setpriv = require_tool("setpriv")
    private = tmp_path / "run"
    private.mkdir(mode=0o700)  # as systemd's RuntimeDirectoryMode=0700
    proc = subprocess.run(
        [
            setpriv,
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            sys.executable,
            "-m",
            "shim_integration.cli",
            "status",
            "--address",
            str(private / "snapshotter.sock"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stderr == (
        f"erofs-passthrough status: cannot reach {private}/snapshotter.sock: Permission denied\n"
    )
