"""Package `__init__`s that re-export their public API without importing it.

A package's `__init__` stays light (importing the EROFS format loads no compressor, importing
`snapshotter` loads no gRPC): each re-exported name is imported from its module on first use.
The `__init__` also imports the same names under `if TYPE_CHECKING:` so that type checkers
and editors see them; tests/unit/test_import_graph.py checks that both lists agree with `__all__`.
`snapshotter/__init__.py` and `passthrough/__init__.py` carry their own copy of these few
lines instead: the guest image ships them with a handful of modules and not this one.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(
    package: str, exports: dict[str, str], namespace: dict[str, object]
) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """`__getattr__` and `__dir__` for PACKAGE: EXPORTS maps a name to the module it lives in
    (a name mapped to "" is a submodule of PACKAGE); NAMESPACE is the package's globals(),
    where each name is cached once imported."""

    def __getattr__(name: str) -> object:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = exports[name]
        if module:
            value = getattr(importlib.import_module(module), name)
        else:
            value = importlib.import_module(f"{package}.{name}")
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *exports})

    return __getattr__, __dir__
