"""Generate `snapshotter/service/api/` from the `.proto` files beside this module.

Needs grpcio-tools.

    python -m snapshotter.service.proto.generate

The generated modules are committed, so a checkout runs without grpcio-tools; this script is
what produced them, and tests/unit/test_containerd_api.py checks that they still match the `.proto`
files. protoc writes absolute imports named after the proto paths (`from containerd.types
import ...`); they are rewritten to live under `snapshotter.service.api`.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
API_ROOT = PROTO_ROOT.parent / "api"
PACKAGE = "snapshotter.service.api"
_INIT_DOC = "Generated from snapshotter/service/proto by snapshotter.service.proto.generate."
_IMPORT = re.compile(r"^(from|import) containerd\.", re.MULTILINE)
_MODULE_NAME = re.compile(r"(BuildTopDescriptorsAndMessages\(DESCRIPTOR, ')containerd\.")


def proto_files(root: Path = PROTO_ROOT) -> list[str]:
    """The `.proto` files, relative to ROOT (protoc's import paths), in a stable order."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.proto"))


def run_protoc(out_dir: Path, extra: list[str] | None = None) -> None:
    """Run grpcio-tools' protoc over every proto file, writing Python (+ gRPC, stubs) to OUT_DIR."""
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--pyi_out={out_dir}",
        *(extra or []),
        *proto_files(),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")


def _rewrite_imports(out_dir: Path) -> None:
    for path in out_dir.rglob("*.py*"):
        text = path.read_text()
        text = _IMPORT.sub(lambda m: f"{m.group(1)} {PACKAGE}.containerd.", text)
        path.write_text(_MODULE_NAME.sub(lambda m: f"{m.group(1)}{PACKAGE}.containerd.", text))


def _add_init_files(out_dir: Path) -> None:
    for directory in [out_dir, *(p for p in out_dir.rglob("*") if p.is_dir())]:
        init = directory / "__init__.py"
        if not init.exists():
            init.write_text(f'"""{_INIT_DOC}"""\n')


def generate(api_root: Path = API_ROOT) -> None:
    """Regenerate API_ROOT completely; the old tree is replaced only once the new one is whole."""
    staging = Path(tempfile.mkdtemp(prefix=".api-", dir=api_root.parent))
    try:
        run_protoc(staging)
        _rewrite_imports(staging)
        _add_init_files(staging)
        old = api_root.with_name(api_root.name + ".old")
        if api_root.exists():
            os.rename(api_root, old)
        os.rename(staging, api_root)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


if __name__ == "__main__":
    generate()
    print(f"generated {API_ROOT}", file=sys.stderr)
