"""The error tree: its shape is what `snapshotter/errors.py` documents, each class reaches
containerd as the gRPC code its meaning calls for, and a caller can tell a damaged image from a
missing file by class, not by message."""

from __future__ import annotations

import re
from pathlib import Path

import grpc
import pytest

from snapshotter import errors
from snapshotter.erofs.format import FormatError
from snapshotter.erofs.reader import ErofsImage
from snapshotter.fsutil import open_input
from snapshotter.ingest.validate import InvalidLayer
from snapshotter.service.grpc_errors import code_for

# The tree as the docstring draws it: `├── Name` / `│   └── Name`, indented four per level.
TREE_LINE = re.compile(r"^(?P<indent>[│ ]*)[├└]── (?P<name>\w+)\b", re.M)
QUALIFIED = {"FormatError": FormatError, "InvalidLayer": InvalidLayer}


def documented_tree() -> list[tuple[str, str]]:
    """(child, parent) pairs drawn in the errors module's docstring."""
    doc = errors.__doc__ or ""
    stack = ["EpError"]
    pairs = []
    matches = list(TREE_LINE.finditer(doc))
    base = min((len(m.group("indent")) for m in matches), default=0)
    for m in matches:
        depth = (len(m.group("indent")) - base) // 4
        del stack[depth + 1 :]
        if m.group("name") == "passthrough":
            continue
        pairs.append((m.group("name"), stack[depth]))
        stack.append(m.group("name"))
    return pairs


def cls(name: str) -> type[Exception]:
    return QUALIFIED.get(name) or getattr(errors, name)


def test_the_tree_is_the_documented_one() -> None:
    pairs = documented_tree()
    assert len(pairs) >= 15, pairs  # the drawing was parsed, not skipped
    for child, parent in pairs:
        assert cls(child).__bases__[0] is cls(parent), f"{child} should be under {parent}"
    drawn = {child for child, _ in pairs} | {"EpError"}
    assert set(errors.__all__) <= drawn, set(errors.__all__) - drawn


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.NotFound, grpc.StatusCode.NOT_FOUND),
        (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
        (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
        (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
        (errors.DigestMismatch, grpc.StatusCode.INVALID_ARGUMENT),
        (FormatError, grpc.StatusCode.INVALID_ARGUMENT),
        (InvalidLayer, grpc.StatusCode.INVALID_ARGUMENT),
        (errors.VerityMismatch, grpc.StatusCode.INVALID_ARGUMENT),
        (errors.Unimplemented, grpc.StatusCode.UNIMPLEMENTED),
        (errors.Unsupported, grpc.StatusCode.INVALID_ARGUMENT),
        (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
        (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
        (errors.EpError, grpc.StatusCode.UNKNOWN),
    ],
)
def test_each_class_has_its_grpc_code(error: type[Exception], code: grpc.StatusCode) -> None:
    assert code_for(error("x")) == code


def test_a_damaged_image_and_a_missing_file_are_different_errors(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.erofs"
    garbage.write_bytes(b"\xa5" * 8192)
    with pytest.raises(errors.CorruptImage):
        ErofsImage(garbage)
    with pytest.raises(errors.NotFound) as missing:
        open_input(tmp_path / "absent.erofs")
    assert not isinstance(missing.value, errors.CorruptImage)
