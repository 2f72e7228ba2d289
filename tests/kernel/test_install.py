"""The install step is real: `make install` (into temporary prefixes) gives a command that runs
the service from its own virtualenv, and the systemd unit it installs passes
`systemd-analyze verify` (which checks the ExecStart binary exists). The shipped example config
lists every key at its default and loads."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from snapshotter.service.serve_config import ServeConfig, example_toml, load_config
from tests.support.helpers import require_root, require_tool

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "contrib" / "systemd" / "erofs-passthrough.service"


def test_example_config_is_current_and_loads(tmp_path: Path) -> None:
    shipped = (REPO / "contrib" / "serve.toml").read_text()
    assert shipped == example_toml(), "regenerate contrib/serve.toml from example_toml()"
    assert load_config(REPO / "contrib" / "serve.toml") == ServeConfig()
    uncommented = tmp_path / "serve.toml"  # every key set to its default is valid too
    uncommented.write_text(
        "".join(
            line[1:] + "\n"
            for line in shipped.splitlines()
            if line.startswith("#") and " = " in line and not line.startswith("# ")
        )
    )
    assert load_config(uncommented) == ServeConfig()


def test_unit_declares_readiness_and_no_restart_on_config_errors() -> None:
    lines = set(UNIT.read_text().splitlines())
    for expected in (
        "Type=notify",
        "NotifyAccess=main",
        "RestartPreventExitStatus=2",
        "ExecStart=/usr/local/bin/erofs-passthrough serve --config "
        "/etc/erofs-passthrough/serve.toml",
        "PrivateMounts=no",
    ):
        assert expected in lines, expected


@pytest.mark.slow
def test_make_install_gives_a_working_service_and_a_valid_unit(tmp_path: Path) -> None:
    require_root()
    analyze = require_tool("systemd-analyze")
    require_tool("make")
    dirs = {
        "PREFIX": tmp_path / "opt",
        "BINDIR": tmp_path / "bin",
        "UNITDIR": tmp_path / "unit",
        "CONFDIR": tmp_path / "etc",
    }
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only what is installed
    make = subprocess.run(
        ["make", "-s", "install", *(f"{k}={v}" for k, v in dirs.items())],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert make.returncode == 0, make.stdout + make.stderr
    command = dirs["BINDIR"] / "erofs-passthrough"
    unit = dirs["UNITDIR"] / "erofs-passthrough.service"
    assert command.is_symlink() and (dirs["CONFDIR"] / "serve.toml").is_file()

    verify = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=120
    )
    ours = [line for line in verify.stderr.splitlines() if "erofs-passthrough" in line]
    assert verify.returncode == 0 and ours == [], verify.stderr
    assert (
        f"ExecStart={command} serve --config {dirs['CONFDIR']}/serve.toml"
        in unit.read_text().splitlines()
    )

    version = subprocess.run(
        [str(command), "--version"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert version.returncode == 0 and version.stdout.startswith("erofs-passthrough ")

    # the installed command serves, from its own virtualenv, with the installed config
    sock = tmp_path / "sn.sock"
    with open(tmp_path / "serve.log", "wb") as log:
        serve = subprocess.Popen(
            [
                str(command),
                "serve",
                "--config",
                str(dirs["CONFDIR"] / "serve.toml"),
                "--root",
                str(tmp_path / "state"),
                "--address",
                str(sock),
            ],
            env=env,
            cwd=tmp_path,
            stdout=log,
            stderr=log,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            status = subprocess.run(
                [str(command), "status", "--address", str(sock)],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            if status.returncode == 0 or time.monotonic() > deadline or serve.poll() is not None:
                break
            time.sleep(0.2)
        assert status.returncode == 0, (status.stderr, (tmp_path / "serve.log").read_text())
        assert "containerd.services.diff.v1.Diff\tSERVING" in status.stdout
    finally:
        serve.terminate()
        assert serve.wait(timeout=30) == 0

    subprocess.run(
        ["make", "-s", "uninstall", *(f"{k}={v}" for k, v in dirs.items())],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    assert not command.exists() and not unit.exists() and not dirs["PREFIX"].exists()
    assert (dirs["CONFDIR"] / "serve.toml").is_file()  # the operator's config stays
    shutil.rmtree(tmp_path / "state", ignore_errors=True)
