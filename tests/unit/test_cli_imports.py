"""What the CLI imports before it does anything (issue 11: every `convert` paid ~60 ms of
imports, half the run of a small layer; docs/benchmarks.md, "CLI start-up").

Each case runs a fresh interpreter and lists the modules it loaded: no timing, so nothing to
flake. A heavy module here is one a command line does not need: the service (config, mounts,
store layout), the merge and publish stacks, the VM side, grpc, cryptography, importlib.metadata
(only `--version` reads it), the verity stack and the reader (a tar converted without
`--verity` needs neither), zstandard and `platform` (only a .tar.zst needs them).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import zstandard

from snapshotter.ingest import convert

REPO = Path(__file__).resolve().parents[2]

# Prefixes: a module whose name is one of these or starts with one and a dot.
NEVER = (
    "snapshotter.service",
    "snapshotter.fsmeta.merge",
    "shim_integration.publish",
    "shim_integration.registry",
    "shim_integration.testbed",
    "passthrough.cli",
    "passthrough.qmp",
    "grpc",
    "google.protobuf",
    "cryptography",
)
NOT_FOR_CONVERT = (
    *NEVER,
    "importlib.metadata",
    "snapshotter.verity",
    "snapshotter.erofs.image_verity",
    "snapshotter.erofs.reader",
    "snapshotter.ingest.validate",
    "snapshotter.ingest.dir_import",
    "google_crc32c",
    "json",
    "uuid",  # it loads `platform`; convert.py computes UUIDv5 itself (checked below)
    "zstandard",  # (it loads `platform` too) only a .tar.zst layer needs it
    "platform",
)
# `convert --help` builds the parser alone: not even the conversion stack.
NOT_FOR_HELP = (
    *NOT_FOR_CONVERT,
    "snapshotter.ingest.convert",
    "snapshotter.erofs.writer",
    "snapshotter.ingest.tarstream",
)

# Run `main(argv)` in a fresh interpreter (SystemExit from --help/--version caught), then print
# the modules loaded by then, on a line of their own (json is imported after the snapshot).
PROBE = """
import sys
from shim_integration.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
loaded = sorted(sys.modules)
import json
print()
print(json.dumps(loaded))
"""


def _loaded(*argv: str, code: str = PROBE) -> list[str]:
    path = [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    out = subprocess.run(
        [sys.executable, "-c", code, *argv],
        check=True,
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    ).stdout
    names: list[str] = json.loads(out.splitlines()[-1])
    return names


def _heavy(loaded: list[str], forbidden: tuple[str, ...]) -> list[str]:
    return [m for m in loaded if any(m == f or m.startswith(f + ".") for f in forbidden)]


def _layer(tmp_path: Path) -> Path:
    layer = tmp_path / "layer.tar"
    subprocess.run(["tar", "-cf", str(layer), "-C", str(REPO), "README.md"], check=True)
    return layer


def test_importing_the_cli_loads_no_command() -> None:
    code = (
        "import sys, shim_integration.cli; loaded = sorted(sys.modules); import json; "
        "print(); print(json.dumps(loaded))"
    )
    loaded = _loaded(code=code)
    assert "shim_integration.cli" in loaded
    assert _heavy(loaded, (*NOT_FOR_HELP, "snapshotter.cli")) == []


def test_command_help_loads_no_library() -> None:
    # (the root `--help` loads every command's module: it lists what each registers)
    assert _heavy(_loaded("convert", "--help"), NOT_FOR_HELP) == []


def test_version_loads_no_command() -> None:
    # argparse acts on a leading --version, and exits, before it looks at any command.
    loaded = _loaded("--version")
    assert "importlib.metadata" in loaded
    forbidden = tuple(f for f in NOT_FOR_HELP if f != "importlib.metadata")
    assert _heavy(loaded, (*forbidden, "snapshotter.cli")) == []


def test_convert_loads_only_the_conversion(tmp_path: Path) -> None:
    out = tmp_path / "layer.erofs"
    loaded = _loaded("convert", str(_layer(tmp_path)), str(out))
    assert out.stat().st_size > 0  # it did convert
    assert "snapshotter.ingest.convert" in loaded
    assert _heavy(loaded, NOT_FOR_CONVERT) == []


def test_the_probe_sees_what_a_command_needs(tmp_path: Path) -> None:
    # The check can fail: the same probe finds the verity stack once --verity asks for it,
    # and the reader and json under `inspect --json`.
    out = tmp_path / "layer.erofs"
    loaded = _loaded("convert", "--verity", str(_layer(tmp_path)), str(out))
    assert "snapshotter.verity.builder" in _heavy(loaded, NOT_FOR_CONVERT)
    loaded = _loaded("inspect", "--json", str(out))
    assert {"snapshotter.erofs.reader", "json"} <= set(_heavy(loaded, NOT_FOR_CONVERT))
    # and zstandard for a .tar.zst, still converted
    zst = tmp_path / "layer.tar.zst"
    zst.write_bytes(zstandard.ZstdCompressor().compress(_layer(tmp_path).read_bytes()))
    out.unlink()
    loaded = _loaded("convert", str(zst), str(out))
    assert out.stat().st_size > 0
    assert "zstandard" in _heavy(loaded, NOT_FOR_CONVERT)


def test_layer_uuid_is_uuid5_of_the_identity() -> None:
    namespace = convert.LAYER_UUID_NAMESPACE
    assert namespace == uuid.UUID("6f1d3c64-5f6e-4d0a-9c61-2f0b5b1e9a17")
    identities = ["", "sha256:" + "0" * 64, "é\u1234", "x" * 1000]
    identities += ["sha256:" + hashlib.sha256(b"%d" % i).hexdigest() for i in range(200)]
    for identity in identities:
        got = convert.layer_uuid(identity)
        assert got == uuid.uuid5(namespace, identity).bytes
        assert convert._uuid_str(got) == str(uuid.UUID(bytes=got))
    for raw in (bytes(16), b"\xff" * 16, bytes(range(16))):
        assert convert._uuid_str(raw) == str(uuid.UUID(bytes=raw))
