"""Which compiled extensions are in use: one rule for all of them.

Every compiled loop (`verity/_hashrun.c`, `ingest/_tarhdr.c`, `fsmeta/_mergepack.c`,
`fsmeta/_mergescan.c`) has a pure-Python twin that gives the same result (the tests compare
them) and says why where the input is bad. An extension is used when it was built and
imports, unless `EROFS_PASSTHROUGH_PURE` is set to anything but "" or "0" when the module
using it is imported (the tests and benchmarks of the pure paths set it). Standard library
only: the guest payload carries this module with `verity/hashing.py`.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

__all__ = ["compiled", "pure_forced"]

PURE_ENV = "EROFS_PASSTHROUGH_PURE"


def pure_forced() -> bool:
    """Whether the environment asks for the pure-Python loops."""
    return os.environ.get(PURE_ENV, "") not in ("", "0")


def compiled(name: str, *required: str) -> ModuleType | None:
    """The extension module `name`, or None (then its pure twin runs): the pure loops are
    forced, it was not built (no compiler, headers or libssl at install), or it was built
    from an older source that lacks one of the `required` attributes."""
    if pure_forced():
        return None
    try:
        module = importlib.import_module(name)
    except ImportError:
        return None
    if not all(hasattr(module, attr) for attr in required):
        return None
    return module
