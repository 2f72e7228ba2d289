"""The guest payload (passthrough/guest/payload.py) is all the guest needs of this repository:
copied alone into an empty directory and imported the way the guest's init starts the agent
(isolated from this checkout and the host's site-packages, PYTHONPATH = that directory plus the
system's dist-packages), every payload module imports. A guest module that imports something
outside the payload fails here in seconds, not at the guest's boot under QEMU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from passthrough.guest import payload


def _copy_payload(dest: Path, extra: dict[str, bytes] | None = None) -> None:
    for rel, data in {**payload.files(), **(extra or {})}.items():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_bytes(data)


def _check(payload_dir: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`python3 -S -m passthrough.guest --check` as init.sh starts the agent, with nothing of
    the host's environment but the payload (and, for cryptography, the interpreter's own
    site-packages: the guest's Debian python3-cryptography stands in for it)."""
    site = [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    env = {
        "PYTHONPATH": ":".join([str(payload_dir), *site]),
        "PATH": "/usr/bin:/bin",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    return subprocess.run(
        [sys.executable, "-S", "-m", "passthrough.guest", "--check"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_payload_alone_imports(tmp_path: Path) -> None:
    (tmp_path / "payload").mkdir()
    _copy_payload(tmp_path / "payload")
    proc = _check(tmp_path / "payload", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "ok\n"
    assert sorted(
        str(p.relative_to(tmp_path / "payload")) for p in (tmp_path / "payload").rglob("*.py")
    ) == sorted(payload.MODULES)


def test_an_import_outside_the_payload_fails(tmp_path: Path) -> None:
    """The check can fail: a guest module importing a host-only module (the service layer)."""
    (tmp_path / "payload").mkdir()
    broken = payload.files()["passthrough/guest/dm.py"] + b"\nimport snapshotter.service\n"
    _copy_payload(tmp_path / "payload", {"passthrough/guest/dm.py": broken})
    proc = _check(tmp_path / "payload", tmp_path)
    assert proc.returncode != 0
    assert "No module named 'snapshotter.service'" in proc.stderr


def test_every_guest_module_is_in_the_payload() -> None:
    here = Path(payload.__file__).parent
    guest = {str(p.relative_to(payload.REPO)) for p in here.glob("*.py")}
    assert guest <= set(payload.MODULES)
